"""One representative instance of every message kind: shared by round-trip and golden tests."""

from __future__ import annotations

from protocol import (
    Bye,
    ControlOk,
    Error,
    ErrorCode,
    GetStatus,
    Heartbeat,
    Hello,
    Lock,
    LockResult,
    Message,
    PageRanges,
    RangeResult,
    RangeStatus,
    SetHostParams,
    SetManualTarget,
    SetTarget,
    Settings,
    SetVmParams,
    Status,
    StatusReply,
    Unlock,
    UnlockResult,
    Welcome,
)

SAMPLES: dict[str, Message] = {
    "hello": Hello(
        vm_id="web-1",
        memsz_bytes=512 << 20,
        agent_version="0.1.0",
        page_kind="vpn",
        supports_2m=True,
        cgroup_version=2,
        max_batch_pages=512,
        held_pages=2048,
        last_host_session_id="h-5f3a",
        stats_keys=("swap_used_bytes", "psi_full_avg10", "pgmajfault"),
        vm_secret="Zm9vYmFyYmF6cXV1eDEyMzQ",
    ),
    "welcome": Welcome(
        host_session_id="h-5f3a",
        report_interval_ms=1000,
        host_timeout_ms=5000,
        batch_limit_pages=512,
        sample_period_ms=60000,
        reclaim=False,
        vm_secret="Zm9vYmFyYmF6cXV1eDEyMzQ",
    ),
    "settings": Settings(sample_period_ms=10000),
    "set_target": SetTarget(target_pages=65536, target_seq=7),
    "lock": Lock(pages=PageRanges(((4096, 512), (9000, 3))), adopt=False),
    "unlock": Unlock(pages=PageRanges(((4096, 256),))),
    "lock_result": LockResult(
        results=(
            RangeResult(start=4096, count=512, status=RangeStatus.OK),
            RangeResult(start=9000, count=3, status=RangeStatus.DUPLICATE),
        ),
        target_pages=65536,
        target_seq=7,
    ),
    "unlock_result": UnlockResult(
        results=(RangeResult(start=4096, count=256, status=RangeStatus.OK),), target_pages=0, target_seq=8
    ),
    "status": Status(
        balloon_pages=65536,
        acked_target_seq=7,
        refused_pages=0,
        agent_state="idle",
        usage_bytes=400 << 20,
        ws_touched_ratio=0.25,
        ws_samples=3,
        ws_current_ratio=0.5,
        ws_method="referenced",
        stats=(120 << 20, 0.5, None),
    ),
    "heartbeat": Heartbeat(),
    "bye": Bye(reason="SIGTERM"),
    "error": Error(code=int(ErrorCode.UNKNOWN_KIND), detail="unknown message kind 'x'", in_reply_to=None),
    "get_status": GetStatus(),
    "status_reply": StatusReply(
        snapshot={"host": {"state": "soft", "free_bytes": 1 << 30}, "vms": [{"vm_id": "web-1", "balloon_pages": 5}]}
    ),
    "set_vm_params": SetVmParams(vm_id="db", params={"shares": "high", "reservation_bytes": 128 << 20}),
    "set_host_params": SetHostParams(params={"idle_tax_ratio": 0.5, "sample_period_ms": 10000},
                                     control_token="c2VjcmV0LXRva2VuLWZvci10ZXN0cw"),
    "set_manual_target": SetManualTarget(vm_id="web-1", balloon_target_pages=None),
    "control_ok": ControlOk(detail="idle_tax_ratio 0.75 -> 0.5", data={"idle_tax_ratio": 0.5}),
}
