"""jaxbatch: batching inside `jit`, as pure `init / step / flush` functions."""

from ._src.base import (
    Batcher as Batcher,
    Counter as Counter,
    Emissions as Emissions,
    Emit as Emit,
    FeedFn as FeedFn,
    FlushFn as FlushFn,
    InitFn as InitFn,
    Stats as Stats,
    StepFn as StepFn,
    join_resident as join_resident,
    operation_stats as operation_stats,
    reset_operation_stats as reset_operation_stats,
    split_resident as split_resident,
    when_ready as when_ready,
)
from ._src.batch import Batch as Batch, create_batch_from_arrays as create_batch_from_arrays
from ._src.batchers.bucket import (
    Bucketed as Bucketed,
    BucketState as BucketState,
    bucket_by as bucket_by,
    bucket_by_length as bucket_by_length,
    by_bucket as by_bucket,
)
from ._src.batchers.concat_and_split import (
    ConcatAndSplitState as ConcatAndSplitState,
    concat_and_split as concat_and_split,
)
from ._src.batchers.fixed_size import FixedSizeState as FixedSizeState, fixed_size as fixed_size
from ._src.batchers.multi_rate import MultiRateState as MultiRateState, multi_rate as multi_rate
from ._src.batchers.pack import (
    PackState as PackState,
    pack as pack,
    packing_stats as packing_stats,
)
from ._src.batchers.rebatch import (
    RebatchState as RebatchState,
    rebatch as rebatch,
    unbatch as unbatch,
)
from ._src.batchers.shuffle import ShuffleState as ShuffleState, shuffle as shuffle
from ._src.checkpoint import load_state as load_state, save_state as save_state
from ._src.combinators import (
    FilterState as FilterState,
    MapState as MapState,
    Moments as Moments,
    StatisticsState as StatisticsState,
    StatsFn as StatsFn,
    filter_elements as filter_elements,
    get_statistics as get_statistics,
    has_statistics as has_statistics,
    map_elements as map_elements,
    reset_statistics as reset_statistics,
    running_moments as running_moments,
    set_statistics as set_statistics,
    with_statistics as with_statistics,
)
from ._src.corpus import (
    TokenCorpus as TokenCorpus,
    TokenRecords as TokenRecords,
    write_token_corpus as write_token_corpus,
    write_token_records as write_token_records,
)
from ._src.distributed_checkpoint import (
    load_distributed as load_distributed,
    save_distributed as save_distributed,
)
from ._src.drivers import (
    BatcherRuntimeError as BatcherRuntimeError,
    BatchIterator as BatchIterator,
    IterateCheckpoint as IterateCheckpoint,
    batch_all as batch_all,
    collect as collect,
    consume as consume,
    drain as drain,
    iterate as iterate,
    scan as scan,
)
from ._src.element import (
    Element as Element,
    Metadata as Metadata,
    create_element as create_element,
)
from ._src.host import (
    SOURCE_STATE_BYTES as SOURCE_STATE_BYTES,
    HostCheckpoint as HostCheckpoint,
    Prefetcher as Prefetcher,
    prefetch as prefetch,
    scan_host as scan_host,
)
from ._src.ops import (
    concatenate as concatenate,
    conditional_transform as conditional_transform,
    iterative_transform as iterative_transform,
    select_rows as select_rows,
    select_rows_compact as select_rows_compact,
    update as update,
    while_transform as while_transform,
)
from ._src.pipeline import (
    PipelineState as PipelineState,
    next_positions as next_positions,
    pipeline as pipeline,
    progress as progress,
    with_data as with_data,
    without_data as without_data,
)
from ._src.reshard import reshard_pipeline as reshard_pipeline
from ._src.sharding import (
    DeviceStates as DeviceStates,
    batch_sharding as batch_sharding,
    device_streams as device_streams,
    global_batch as global_batch,
    init_per_device as init_per_device,
    resume_per_device as resume_per_device,
    scan_per_device as scan_per_device,
    shard as shard,
    stream_indices as stream_indices,
)
from ._src.sources import (
    Located as Located,
    Order as Order,
    OrderState as OrderState,
    epochs as epochs,
    mixture as mixture,
    order_rows as order_rows,
    permute as permute,
)
from ._src.spec import batch_spec as batch_spec, element_spec as element_spec

__version__ = "0.1.0"
