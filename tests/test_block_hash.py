"""pdserve's block hash: the pinned scheme every machine in the cluster shares."""

import struct
import subprocess
import sys

import pytest
import xxhash

from engine.block_hash import SCHEME_VERSION, block_hash, hash_chain, root_hash

MODEL = "pdserve-tiny-llama"


def test_pinned_test_vector():
    # Changing the scheme must change SCHEME_VERSION and these digests together.
    assert SCHEME_VERSION == 1
    assert root_hash(MODEL).hex() == "7e8e4e4231baff1cf4ae4dc1b61509f4"
    assert [h.hex() for h in hash_chain(MODEL, list(range(10)), 4)] == [
        "42192b5187b32941c8fe8cdf5da18965",
        "81db26605db9bac2945bdd4bd1934ac2",
    ]
    assert block_hash(root_hash("m"), [0, 1, 2**32 - 1]).hex() == "747300cea6a3907ef1209a68aec62d95"


def test_byte_layout_is_xxh3_128_of_parent_then_u32_little_endian_tokens():
    root = xxhash.xxh3_128_digest(b"pdserve-block-hash\x00" + struct.pack("<I", SCHEME_VERSION) + MODEL.encode())
    assert root_hash(MODEL) == root
    assert block_hash(root, [7, 8]) == xxhash.xxh3_128_digest(root + b"\x07\x00\x00\x00\x08\x00\x00\x00")


def test_equal_prefixes_give_equal_chains():
    a = hash_chain(MODEL, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_chain(MODEL, [1, 2, 3, 4, 9, 9, 9, 9], 4)
    assert a[0] == b[0] and a[1] != b[1]


def test_a_block_depends_on_everything_before_it():
    assert hash_chain(MODEL, [1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != hash_chain(MODEL, [0, 2, 3, 4, 5, 6, 7, 8], 4)[1]


def test_models_never_share_keys():
    assert hash_chain("model-a", [1, 2, 3, 4], 4) != hash_chain("model-b", [1, 2, 3, 4], 4)


def test_only_full_blocks_are_hashed():
    assert len(hash_chain(MODEL, list(range(11)), 4)) == 2
    assert hash_chain(MODEL, [1, 2, 3], 4) == []


@pytest.mark.parametrize("tokens", [[-1], [2**32], [1.5]])
def test_token_ids_outside_u32_are_refused(tokens):
    with pytest.raises(ValueError, match="token ids"):
        block_hash(root_hash(MODEL), tokens)


def test_same_digests_in_a_fresh_interpreter():
    # Python's hash() is salted per process; this scheme must not be.
    code = "from engine.block_hash import hash_chain; print(hash_chain('m', list(range(8)), 4)[-1].hex())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hash_chain("m", list(range(8)), 4)[-1].hex()


def test_engine_package_and_block_hash_import_neither_torch_nor_vllm():
    code = "import sys, engine, engine.block_hash; print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"
