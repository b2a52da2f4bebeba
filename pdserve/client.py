"""A small gRPC client for a running pdserve: what ``pdserve generate`` and ``pdserve status`` use."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from pdserve_pb.v1 import generate_pb2 as pb
from pdserve_pb.v1 import generate_pb2_grpc as pb_grpc

API_KEY_ENV = "PDSERVE_API_KEY"


class GenerationClient:
    """``api_key`` goes as ``authorization: Bearer <key>`` metadata on every call."""

    def __init__(self, address: str, timeout_s: float = 300.0, api_key: str | None = None):
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None

    def generate(self, prompt: str | list[int], **sampling) -> Iterator[pb.GenerateResponse]:
        request = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        yield from self._stub.Generate(request, timeout=self._timeout_s, metadata=self._metadata)

    def status(self) -> pb.StatusResponse:
        return self._stub.Status(pb.StatusRequest(), timeout=10, metadata=self._metadata)

    def models(self) -> pb.ListModelsResponse:
        return self._stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()
