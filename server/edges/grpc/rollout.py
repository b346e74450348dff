"""The gRPC edge of rollouts (docs/rollout.md): a model's candidate and figures as ``classifier.v1.Rollout``, and
the operator calls PromoteVersion, RejectVersion and RollbackModel (model-control calls: the operator token rule of
server/edges/grpc/security.py). Runs on the event loop; the manager does the work.
"""

from __future__ import annotations

from classifier.v1 import classifier_pb2 as pb

from server.core import errors
from server.edges.common.describe import RolloutDescription
from server.models.manager import ModelManager, ModelRecord

OPERATOR_REASON = "by an operator"


def rollout_info(rollout: RolloutDescription) -> pb.Rollout:
    """The candidate's figures (all zero before the first comparison)."""
    spec, scores = rollout.spec, rollout.scores
    info = pb.Rollout(candidate_version=rollout.version, mode=spec.mode, decision=spec.decision,
                      min_requests=spec.min_requests, min_agreement=spec.min_agreement)
    if scores is not None:
        info.compared, info.agreement, info.topk_overlap = scores.compared, scores.agreement, scores.topk_overlap
        info.mean_abs_diff, info.errors, info.error_rate = scores.mean_abs_diff, scores.errors, scores.error_rate
        info.compute_ratio = scores.compute_ratio or 0.0
        info.labels_differ = scores.labels_differ
    return info


async def promote(manager: ModelManager, request: pb.PromoteVersionRequest) -> ModelRecord:
    """PromoteVersion: the candidate ``request.version`` serves. Raises ModelNotFound, InvalidInput or
    PreconditionFailed (not the candidate)."""
    record = manager.get(request.model)
    _check_version(request.version)
    await manager.decide(record.name, request.version, True, OPERATOR_REASON, by="operator")
    return manager.get(record.name)


async def reject(manager: ModelManager, request: pb.RejectVersionRequest) -> ModelRecord:
    """RejectVersion: the candidate is rejected; the serving version is rolled back. Raises ModelNotFound,
    InvalidInput or PreconditionFailed."""
    record = manager.get(request.model)
    _check_version(request.version)
    reason = request.reason or OPERATOR_REASON
    serving = record.serving()
    if serving is not None and serving.version == request.version:
        await manager.reject_serving(record.name, reason, expected=request.version)  # re-checked under the lock
    else:
        await manager.decide(record.name, request.version, False, reason, by="operator")
    return manager.get(record.name)


async def rollback(manager: ModelManager, request: pb.RollbackModelRequest) -> ModelRecord:
    """RollbackModel: the serving version is rejected and the previous one serves. Raises ModelNotFound or
    PreconditionFailed."""
    record = manager.get(request.model)
    await manager.reject_serving(record.name, request.reason or f"rolled back {OPERATOR_REASON}")
    return manager.get(record.name)


def _check_version(version: int) -> None:
    if version <= 0:
        raise errors.InvalidInput(f"version must be a version number (> 0), got {version}")
