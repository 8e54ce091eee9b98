"""The adapter registry: validated, versioned, content-addressed adapters and task endpoints.

It imports neither torch, grpc nor anything from ``loraplex.server``: the server passes its
adapter validator in as a callback (see :meth:`AdapterStore.publish`).
"""

from .errors import StoreError
from .names import NAME_PATTERN, format_ref, parse_ref, validate_file_name, validate_name
from .records import AdapterRecord, EndpointRecord
from .store import AdapterStore

__all__ = [
    "NAME_PATTERN",
    "AdapterRecord",
    "AdapterStore",
    "EndpointRecord",
    "StoreError",
    "format_ref",
    "parse_ref",
    "validate_file_name",
    "validate_name",
]
