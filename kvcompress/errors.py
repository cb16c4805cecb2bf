"""Exception hierarchy of kvcompress.

The classes are created by the C extension at import time (so C and Python
raise the very same types) and re-exported here:

- ``KVCompressError(Exception)``: base of everything kvcompress raises.
- ``KVCompressValueError(KVCompressError, ValueError)``: bad value, shape,
  range or device of an argument.
- ``KVCompressTypeError(KVCompressError, TypeError)``: wrong type or dtype.
- ``KVCompressUnsupportedError(KVCompressError, NotImplementedError)``: a
  model feature kvcompress does not handle, refused by name (defined here:
  only Python raises it).
"""

from kvcompress._C import KVCompressError, KVCompressTypeError, KVCompressValueError


class KVCompressUnsupportedError(KVCompressError, NotImplementedError):
    """A model or generation feature kvcompress cannot honour (named in the message)."""


__all__ = ["KVCompressError", "KVCompressValueError", "KVCompressTypeError", "KVCompressUnsupportedError"]
