"""Typed errors of the engine layer: each names the field at fault."""


class EngineError(Exception):
    """Base of every error the engine layer raises on purpose."""


class EngineConfigError(EngineError):
    """The engine (or the model directory) cannot be built as configured."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # crosses a process boundary (a spawned engine process, Ray) whole, with its field
        return type(self), (self.field, self.message)


class EngineInputError(EngineError):
    """A request the engine refuses; the engine keeps serving."""

    def __init__(self, field: str, message: str, request_id: str | None = None):
        self.field = field
        self.message = message
        self.request_id = request_id
        where = f" (request {request_id})" if request_id else ""
        super().__init__(f"{field}: {message}{where}")

    def __reduce__(self):  # crosses Ray from a worker to the router whole, with its field
        return type(self), (self.field, self.message, self.request_id)


class EngineDeadError(EngineError):
    """The engine's processes (engine core, a worker rank) died: the worker is lost, not the request.

    The router treats it as a lost worker (the request moves on); the replica reports itself
    unhealthy, so Serve replaces it."""
