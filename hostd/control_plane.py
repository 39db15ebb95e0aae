"""The control plane (balloonctl): status, vm settings, host settings and manual targets, with
their validation, admission and authority; and the settings kept across restarts. A change
returns its reply and the frames it sends to agents (a changed sample period reaches every
registered agent in a `settings` message); the caller recomputes the targets it affects."""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Mapping
from typing import Any

from hostd import policy
from hostd.config import VmParams
from hostd.context import CoreContext, HostSettings, Outgoing
from hostd.registry import VmRecord
from protocol import (
    PAGE_SIZE_BYTES,
    ControlOk,
    ErrorCode,
    GetStatus,
    Message,
    ProtocolError,
    SetHostParams,
    SetManualTarget,
    Settings,
    SetVmParams,
    StatusReply,
    decode,
)
from protocol.limits import MAX_CONTROL_REQUEST_BYTES, MAX_PAGES
from protocol.messages import VM_PARAM_KEYS, check_vm_id

log = logging.getLogger("hostd.core")

MIN_HOST_MEMORY_BYTES = 16 << 20  # below this no vm can be allocated anything (ρ would be infinite)

Change = SetVmParams | SetHostParams | SetManualTarget


class ControlPlane:
    def __init__(self, ctx: CoreContext, control_token: str | None) -> None:
        self.ctx = ctx
        self.registry = ctx.registry
        # Authority for control changes without CURVE: the token in control_token_file.
        self.control_token = control_token
        self.settings_dirty = False

    def decode(self, frame: bytes) -> tuple[Message, int]:
        envelope = decode(frame, MAX_CONTROL_REQUEST_BYTES)
        return envelope.message, envelope.seq

    def authorize(self, message: Change, operator: bool) -> None:
        """`operator`: the connection itself is an authority (a CURVE operator key, or an
        ipc:// socket whose file mode let only the owner in); else a change needs the token."""
        if operator:
            return
        token = message.control_token
        if self.control_token is None or token is None or not hmac.compare_digest(token, self.control_token):
            self.ctx.counters["control_refused"] += 1
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "changes need hostd's control token (balloonctl reads it "
                                "from /run/balloonlab/control.token, --token-file or BALLOONLAB_CONTROL_TOKEN_FILE)"
                                if self.control_token is not None else
                                "changes need an operator key (CURVE) or the ipc:// control socket; "
                                "hostd has no control token")

    def change(self, message: Message, now_ms: int, operator: bool) -> tuple[str, dict[str, Any], str, Outgoing]:
        """Apply a change request: (detail, data, the trigger for the recompute it needs, the
        frames to agents it causes)."""
        if message.plane != "control" or isinstance(message, StatusReply | ControlOk | GetStatus):
            raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not a control request")
        to_agents: Outgoing = []
        if isinstance(message, SetVmParams):
            self.authorize(message, operator)
            detail, data = self.set_vm_params(message, now_ms)
            trigger = f"{message.vm_id} settings changed"
        elif isinstance(message, SetHostParams):
            self.authorize(message, operator)
            before = self.ctx.settings.sample_period_ms
            detail, data = self.set_host_params(message, now_ms)
            trigger = "host settings changed"
            if self.ctx.settings.sample_period_ms != before:
                to_agents = self.push_settings()
        elif isinstance(message, SetManualTarget):
            self.authorize(message, operator)
            detail, data = self.set_manual_target(message, now_ms)
            trigger = f"{message.vm_id} manual target"
        else:
            raise ProtocolError(ErrorCode.UNEXPECTED_KIND, f"{message.kind} is not handled")
        self.settings_dirty = True
        self.ctx.snapshot_cache = None
        return detail, data, trigger, to_agents

    def push_settings(self) -> Outgoing:
        """The settings agents act on, as they are now, to every registered agent (the same
        values a welcome gives a newcomer)."""
        ctx = self.ctx
        message = Settings(sample_period_ms=ctx.settings.sample_period_ms)
        links = [vm.agent for vm in self.registry.vms.values() if vm.alive and vm.agent is not None]
        return [(link.route, ctx.frame(message)) for link in links]

    def _vm(self, vm_id: str) -> VmRecord:
        vm = self.registry.vms.get(vm_id)
        if vm is None:
            raise ProtocolError(ErrorCode.UNKNOWN_VM, f"no vm {vm_id!r}; known: {sorted(self.registry.vms)}")
        return vm

    def _saved(self, vm_id: str) -> dict[str, Any]:
        return self.ctx.vm_overrides.setdefault(vm_id, {"params": {}, "manual_balloon_pages": None})

    def set_vm_params(self, request: SetVmParams, now_ms: int) -> tuple[str, dict[str, Any]]:
        ctx = self.ctx
        vm = self._vm(request.vm_id)
        memsz = vm.identity.claimed_memsz_bytes
        values: dict[str, Any] = {
            "shares": vm.params.shares, "reservation_bytes": vm.params.reservation_bytes,
            "limit_bytes": vm.params.limit_bytes, "maxmemctl_bytes": vm.params.maxmemctl_bytes,
        }
        defaults = VmParams()
        for key, value in request.params.items():
            values[key] = getattr(defaults, key) if value is None else value
        reservation = values["reservation_bytes"]
        limit = values["limit_bytes"]
        assert isinstance(reservation, int)
        if reservation > memsz:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"reservation {reservation >> 20} MiB exceeds memsz "
                                f"{memsz >> 20} MiB")
        if isinstance(limit, int) and limit > memsz:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"limit {limit >> 20} MiB exceeds memsz {memsz >> 20} MiB "
                                "(a vm never gets more than its memory size)")
        if isinstance(limit, int) and limit < reservation:
            raise ProtocolError(ErrorCode.INVALID_FIELD, "limit is below the reservation")
        refusal = policy.admission_check([self.registry.reserved_pages(vm.vm_id)], reservation // PAGE_SIZE_BYTES,
                                         ctx.settings.host_memory_pages, ctx.settings.sliding_min_free)
        if refusal:
            raise ProtocolError(ErrorCode.ADMISSION_REFUSED, refusal)
        old = vm.params
        self.registry.set_params(vm, VmParams(**values))
        saved = self._saved(vm.vm_id)
        saved["params"] = {**saved["params"], **request.params}
        changes = {k: (getattr(old, k), getattr(vm.params, k)) for k in request.params}
        detail = "; ".join(f"{k} {a} → {b}" for k, (a, b) in changes.items())
        ctx.event(now_ms, "vm_params", vm=vm.vm_id, changes={k: [a, b] for k, (a, b) in changes.items()})
        return f"{vm.vm_id}: {detail}", {k: b for k, (_a, b) in changes.items()}

    def set_host_params(self, request: SetHostParams, now_ms: int) -> tuple[str, dict[str, Any]]:
        ctx = self.ctx
        defaults = HostSettings.from_config(ctx.config)
        staged = dataclasses.replace(ctx.settings)  # all-or-nothing: apply only if every value passes
        changes: dict[str, tuple[Any, Any]] = {}
        for key, value in request.params.items():
            if key == "host_memory_bytes":
                pages = defaults.host_memory_pages if value is None else int(value) // PAGE_SIZE_BYTES
                if pages * PAGE_SIZE_BYTES < MIN_HOST_MEMORY_BYTES:
                    raise ProtocolError(ErrorCode.INVALID_FIELD, f"host_memory_bytes: at least "
                                        f"{MIN_HOST_MEMORY_BYTES >> 20} MiB (minFree alone is 6 % of it)")
                refusal = policy.admission_check([self.registry.reserved_pages("")], 0, pages,
                                                 staged.sliding_min_free)
                if refusal:
                    raise ProtocolError(ErrorCode.ADMISSION_REFUSED, f"host_memory_bytes: {refusal}")
                changes[key] = (staged.host_memory_pages * PAGE_SIZE_BYTES, pages * PAGE_SIZE_BYTES)
                staged.host_memory_pages = pages
            else:
                new_value = getattr(defaults, key) if value is None else value
                if key == "idle_tax_ratio":
                    new_value = float(new_value)
                changes[key] = (getattr(staged, key), new_value)
                setattr(staged, key, new_value)
        ctx.settings = staged
        for key, value in request.params.items():
            if value is None:
                ctx.host_overrides.pop(key, None)
            else:
                ctx.host_overrides[key] = value
        if "host_memory_bytes" in request.params:
            for vm in self.registry.vms.values():
                vm.memsz_cap_pages = ctx.memsz_cap(vm)
        ctx.event(now_ms, "host_params", changes={k: [a, b] for k, (a, b) in changes.items()})
        log.info("host settings changed: %s", changes)
        detail = "; ".join(f"{k} {a} → {b}" for k, (a, b) in changes.items())
        return detail, {k: b for k, (_a, b) in changes.items()}

    def set_manual_target(self, request: SetManualTarget, now_ms: int) -> tuple[str, dict[str, Any]]:
        vm = self._vm(request.vm_id)
        pages = request.balloon_target_pages
        if pages is not None and pages > vm.memsz_pages:
            raise ProtocolError(ErrorCode.INVALID_FIELD, f"balloon target {pages} pages exceeds memsz "
                                f"{vm.memsz_pages} pages")
        old = vm.targets.manual_balloon_pages
        vm.targets.manual_balloon_pages = pages
        self._saved(vm.vm_id)["manual_balloon_pages"] = pages
        self.ctx.event(now_ms, "manual_target", vm=vm.vm_id, old=old, new=pages)
        shown = "auto" if pages is None else f"{pages} pages"
        return f"{vm.vm_id}: balloon target {shown}", {"balloon_target_pages": pages}

    # ---- settings kept across restarts -------------------------------------------------------
    def restore_settings(self, document: Mapping[str, Any], now_ms: int) -> list[str]:
        """Apply what `settings_document()` saved before a restart; what no longer passes
        validation is skipped with a reason (returned for the log)."""
        skipped = []
        host = document.get("host")
        if isinstance(host, dict) and host:
            try:
                self.set_host_params(SetHostParams(params=host), now_ms)
            except (ProtocolError, TypeError, ValueError) as exc:
                skipped.append(f"host settings {host}: {exc}")
        vms = document.get("vms")
        for vm_id, entry in (vms.items() if isinstance(vms, dict) else ()):
            try:
                check_vm_id(vm_id)
                params = {k: v for k, v in entry.get("params", {}).items() if k in VM_PARAM_KEYS}
                if params:
                    SetVmParams(vm_id=vm_id, params=params)  # validates every value
                manual = entry.get("manual_balloon_pages")
                if manual is not None and (isinstance(manual, bool) or not isinstance(manual, int)
                                           or not 0 <= manual <= MAX_PAGES):
                    raise ValueError(f"manual_balloon_pages {manual!r}")
                self.ctx.vm_overrides[vm_id] = {"params": params, "manual_balloon_pages": manual}
            except (ProtocolError, AttributeError, TypeError, ValueError) as exc:
                skipped.append(f"vm {vm_id!r}: {exc}")
        self.settings_dirty = False
        return skipped

    def settings_document(self) -> dict[str, Any]:
        return {"host": dict(self.ctx.host_overrides),
                "vms": {k: dict(v) for k, v in self.ctx.vm_overrides.items()}}
