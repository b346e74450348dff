"""The model-repository extension, ModelConfig and ModelStatistics as protobuf: the neutral answers of
:mod:`server.edges.common.oip_repository` rendered for ``inference.GRPCInferenceService``. Translation only."""

from __future__ import annotations

from inference import grpc_service_pb2 as oip

from server.edges.common.oip_repository import ConfigTensor, IndexRow, ModelConfig, VersionStatistics
from server.ops.inference_stats import Duration


def index_message(rows: list[IndexRow]) -> oip.RepositoryIndexResponse:
    index = oip.RepositoryIndexResponse.ModelIndex
    return oip.RepositoryIndexResponse(models=[index(name=r.name, version=r.version, state=r.state, reason=r.reason)
                                               for r in rows])


def config_message(config: ModelConfig) -> oip.ModelConfigResponse:
    message = oip.ModelConfig(name=config.name, platform=config.platform, backend=config.backend,
                              max_batch_size=config.max_batch_size,
                              input=[_input(t) for t in config.inputs], output=[_output(t) for t in config.outputs])
    message.dynamic_batching.max_queue_delay_microseconds = config.max_queue_delay_microseconds
    return oip.ModelConfigResponse(config=message)


def _input(tensor: ConfigTensor) -> oip.ModelInput:
    return oip.ModelInput(name=tensor.name, data_type=oip.DataType.Value(tensor.data_type),
                          format=oip.ModelInput.Format.Value(tensor.format), dims=tensor.dims)


def _output(tensor: ConfigTensor) -> oip.ModelOutput:
    return oip.ModelOutput(name=tensor.name, data_type=oip.DataType.Value(tensor.data_type), dims=tensor.dims,
                           label_filename=tensor.label_filename)


def statistics_message(entries: list[VersionStatistics]) -> oip.ModelStatisticsResponse:
    return oip.ModelStatisticsResponse(model_stats=[_version_stats(e) for e in entries])


def _duration(duration: Duration) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=duration.count, ns=duration.ns)


def _version_stats(entry: VersionStatistics) -> oip.ModelStatistics:
    stats = entry.stats
    inference = oip.InferStatistics(success=_duration(stats.success), fail=_duration(stats.fail),
                                    queue=_duration(stats.queue), compute_input=_duration(stats.compute_input),
                                    compute_infer=_duration(stats.compute_infer),
                                    compute_output=oip.StatisticDuration(), cache_hit=_duration(stats.cache_hit))
    batches = [oip.InferBatchStatistics(batch_size=size, compute_infer=_duration(duration))
               for size, duration in sorted(stats.batches.items())]
    return oip.ModelStatistics(name=entry.name, version=entry.version, last_inference=stats.last_inference_ms,
                               inference_count=stats.inference_count, execution_count=stats.execution_count,
                               inference_stats=inference, batch_stats=batches)
