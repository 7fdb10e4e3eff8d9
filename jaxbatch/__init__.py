"""jaxbatch: batching inside `jit`, as pure `init / step / flush` functions."""

from ._src.batch import Batch as Batch, create_batch_from_arrays as create_batch_from_arrays
from ._src.element import (
    Element as Element,
    Metadata as Metadata,
    create_element as create_element,
)
from ._src.spec import batch_spec as batch_spec, element_spec as element_spec

__version__ = "0.1.0"
