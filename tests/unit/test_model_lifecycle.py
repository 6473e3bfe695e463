"""Model lifecycle without Ray (issue 20): models as applications of their own in the
Serve config, the router's live routes, schedulers leaving service, and the checks
made before anything is deployed. (tests/integration/test_model_lifecycle.py runs
`mediagate models` on a real cluster.)"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autoscaling.limits import ScaleChange, changed_deployment, scale_rows
from deployments.router.live_schedulers import on_live_scheduler
from deployments.scheduler.images import Scheduler
from mediagate.cli import service
from mediagate.cli.model_apps import (
    deployment_entries,
    live_models,
    model_application,
    out_of_standby,
    router_app,
    split_models,
    standing_by,
    with_application,
    with_retired,
    with_routes,
    without_application,
)
from mediagate.protocol.catalog import LiveModel, ModelSpec
from mediagate.protocol.errors import ModelMoved, ModelRemoved
from mediagate.protocol.images import ImageGenerationRequest
from mediagate.protocol.work import ImageJob, ImageResult
from models.catalog import load_catalog
from models.checks import (
    NOT_PIPELINES,
    diffusers_pipeline_classes,
    pipeline_class_problems,
    placement_problems,
    weights_problems,
)
from tests.fakes import FakeClock, FakeImageWorker, FakeScheduler, LocalHandle
from tests.unit.harness import Service
from tests.unit.test_video_scheduler import Rig

CATALOG = load_catalog()
SD = CATALOG.models["tiny-sd"]
WAN = CATALOG.models["tiny-wan"]


def shipped(tmp_path: Path) -> dict[str, Any]:
    return service.effective_config(None, "127.0.0.1", 8000, tmp_path)


def apps_by_name(config: dict[str, Any]) -> dict[str, Any]:
    return {app["name"]: app for app in config["applications"]}


def test_a_model_change_touches_one_application_and_the_routers_user_config(
    tmp_path: Path,
) -> None:
    """What makes a change leave the other models alone: every other application's
    entry is the same, and the router's application changes only in user_config (an
    in-place update in Serve, whose code version hashes import path and args)."""
    before = shipped(tmp_path)
    v2 = SD.model_copy(update={"version": "2"})
    new_app = model_application(router_app(before), v2)
    assert new_app["name"] == "model-tiny-sd-v2" and new_app["route_prefix"] is None
    assert new_app["args"]["home"] == str(tmp_path) and new_app["args"]["spec"]["version"] == "2"
    after = with_retired(
        with_routes(
            with_application(before, new_app),
            {"tiny-sd": LiveModel(app="model-tiny-sd-v2", spec=v2)},
        ),
        "model-tiny-sd-v1",
        SD,
        "moved",
    )
    old_apps, new_apps = apps_by_name(before), apps_by_name(after)
    assert new_apps["model-tiny-wan-v1"] == old_apps["model-tiny-wan-v1"]
    router_before, router_after = old_apps["mediagate"], new_apps["mediagate"]
    for key in ("import_path", "args", "route_prefix", "autoscaling_policy"):
        assert router_after.get(key) == router_before.get(key), key
    [entry] = [d for d in router_after["deployments"] if d["name"] == "Router"]
    assert entry["user_config"]["tiers_file"] is None  # its other keys kept
    assert live_models(after)["tiny-sd"].spec.version == "2"
    retired = apps_by_name(after)["model-tiny-sd-v1"]
    assert retired["args"] == old_apps["model-tiny-sd-v1"]["args"]  # no restart
    deployments = {d["name"]: d for d in retired["deployments"]}
    assert deployments["Scheduler-tiny-sd"]["user_config"]["retired"] == "moved"
    assert deployments["Scheduler-tiny-sd"]["user_config"]["batching"]  # kept
    scaling = deployments["TextToImage-tiny-sd"]["autoscaling_config"]
    assert scaling["min_replicas"] == 0 and scaling["downscale_delay_s"] == 0
    assert "initial_replicas" not in scaling and scaling["max_replicas"] == 1
    gone = with_routes(without_application(after, "model-tiny-sd-v1"), {"tiny-sd": None})
    assert "model-tiny-sd-v1" not in apps_by_name(gone) and "tiny-sd" not in live_models(gone)
    assert split_models(gone, CATALOG) == gone  # already split: nothing more to do


def test_a_new_models_scheduler_goes_where_the_router_goes(tmp_path: Path) -> None:
    """On a GPU cluster (serve.gpu.yaml) the routers and schedulers keep to the CPU
    head: a model added live places its scheduler there too, not on a GPU node."""
    gpu = service.effective_config("mediagate/configs/serve.gpu.yaml", "127.0.0.1", 8000, tmp_path)
    added = SD.model_copy(update={"id": "tiny-b"})
    entries = {d["name"]: d for d in model_application(router_app(gpu), added)["deployments"]}
    assert entries["Scheduler-tiny-b"]["ray_actor_options"] == {
        "num_cpus": 0,
        "resources": {"head": 0.01},
    }
    given = [{"name": "Scheduler-tiny-b", "ray_actor_options": {"num_cpus": 0.5}}]
    entries = {
        d["name"]: d for d in model_application(router_app(gpu), added, given)["deployments"]
    }
    assert entries["Scheduler-tiny-b"]["ray_actor_options"] == {"num_cpus": 0.5}  # as given
    cpu = {
        d["name"]: d for d in model_application(router_app(shipped(tmp_path)), added)["deployments"]
    }
    assert cpu["Scheduler-tiny-b"]["ray_actor_options"] == {"num_cpus": 0}


def test_host_memory_is_a_flag_that_a_base_entry_can_also_set(tmp_path: Path) -> None:
    from mediagate.cli.main import build_parser
    from mediagate.cli.models import flagged_fields, spec_from_args

    config = shipped(tmp_path)

    def parsed(*flags: str) -> Any:
        return build_parser().parse_args(["models", "add", "tiny-b", "--like", "tiny-sd", *flags])

    assert spec_from_args(parsed(), config).host_memory is False  # the catalog's default
    assert spec_from_args(parsed("--host-memory"), config).host_memory is True
    assert "host_memory" not in flagged_fields(parsed())  # the base entry's value stays
    assert flagged_fields(parsed("--no-host-memory"))["host_memory"] is False


def code_versions(config: dict[str, Any]) -> dict[str, str]:
    """Serve's code version of each application: a change of it restarts its replicas."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    return {
        app["name"]: get_app_code_version(ServeApplicationSchema.model_validate(app))
        for app in config["applications"]
    }


@pytest.mark.parametrize("made_by", ["shipped config", "bare config entry", "models add"])
def test_no_step_of_a_swap_restarts_an_application_it_keeps(tmp_path: Path, made_by: str) -> None:
    """Serve's own code version (import path, args, policies, and which deployment entries
    carry an autoscaling_config) of every application stays the same through a swap,
    for a model split out by `mediagate up` (from the shipped config, or from an entry
    that names only its ray_actor_options) and for one `models add` made."""
    if made_by == "bare config entry":
        path = tmp_path / "serve.yaml"
        entry = {"name": "TextToImage-tiny-sd", "ray_actor_options": {"num_gpus": 0}}
        app: dict[str, Any] = {"name": "mediagate", "import_path": "deployments.app:build_app"}
        app |= {"args": {"models": ["tiny-sd"]}, "deployments": [entry]}
        path.write_text(json.dumps({"applications": [app]}))
        config = service.effective_config(str(path), "127.0.0.1", 8000, tmp_path)
    else:
        config = shipped(tmp_path)
    router = apps_by_name(config)["mediagate"]
    spec = SD
    if made_by == "models add":
        spec = SD.model_copy(update={"id": "tiny-b"})
        config = with_routes(
            with_application(config, model_application(router, spec)),
            {"tiny-b": LiveModel(app="model-tiny-b-v1", spec=spec)},
        )
    old_app = app_name_of(spec)
    before = code_versions(config)
    v2 = spec.model_copy(update={"version": "2"})
    swapped = with_retired(
        with_routes(
            with_application(config, model_application(router, v2)),
            {spec.id: LiveModel(app=app_name_of(v2), spec=v2)},
        ),
        old_app,
        spec,
        "moved",
    )
    after = code_versions(swapped)
    assert {name: after[name] for name in before} == before
    removed = without_application(swapped, old_app)
    assert {name: code for name, code in code_versions(removed).items()} == {
        name: code for name, code in after.items() if name != old_app
    }


def app_name_of(spec: ModelSpec) -> str:
    return f"model-{spec.id}-v{spec.version}"


def test_scale_changes_follow_a_model_into_its_own_application(tmp_path: Path) -> None:
    """`mediagate scale` and POST /v1/ops/limits name the router's application; a live
    model's limits live in its own."""
    config = shipped(tmp_path)
    details: dict[str, Any] = {
        "proxy_location": "HeadOnly",
        "http_options": config["http_options"],
        "applications": {
            app["name"]: {
                "deployed_app_config": copy.deepcopy(app),
                "deployments": {
                    d["name"]: {"deployment_config": {"autoscaling_config": {"min_replicas": 1}}}
                    for d in app["deployments"]
                },
            }
            for app in config["applications"]
        },
    }
    rows = scale_rows(details, "mediagate", {})
    assert [row["model"] for row in rows] == ["tiny-sd", "tiny-wan"]
    updated, lines = changed_deployment(
        details, "mediagate", ScaleChange(model="tiny-sd", max_replicas=3), free_class=0
    )
    assert lines == ["TextToImage-tiny-sd.autoscaling_config.max_replicas: 1 -> 3"]
    changed = apps_by_name(updated)
    worker = {d["name"]: d for d in changed["model-tiny-sd-v1"]["deployments"]}
    assert worker["TextToImage-tiny-sd"]["autoscaling_config"]["max_replicas"] == 3
    assert changed["mediagate"] == apps_by_name(config)["mediagate"]


def test_the_pipeline_class_check_reads_diffusers_without_importing_torch() -> None:
    probe = (
        "import sys; from models.checks import diffusers_pipeline_classes as c; "
        "print(len(c()), 'torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    count, torch_imported, diffusers_imported = ran.stdout.split()
    assert int(count) > 100 and torch_imported == diffusers_imported == "False"
    import diffusers

    loadable = set()
    for name in dir(diffusers):
        if "Pipeline" not in name or "Modular" in name or name.endswith(NOT_PIPELINES):
            continue
        try:
            if hasattr(getattr(diffusers, name), "from_pretrained"):
                loadable.add(name)
        except (AttributeError, ImportError, RuntimeError):  # a backend not installed
            pass
    assert loadable <= diffusers_pipeline_classes()  # what the package itself exports
    for not_a_pipeline in ("PipelineQuantizationConfig", "StableDiffusionPipelineOutput"):
        assert not_a_pipeline not in diffusers_pipeline_classes()
    for spec in CATALOG.models.values():
        assert spec.pipeline_class in diffusers_pipeline_classes(), spec.id
    refused = SD.model_copy(update={"pipeline_class": "AutoencoderKL"})  # a model, no pipeline
    assert pipeline_class_problems(refused)


def test_checks_say_what_is_wrong_before_anything_is_deployed(tmp_path: Path) -> None:
    assert pipeline_class_problems(SD) == []
    unknown_class = SD.model_copy(update={"pipeline_class": "NoSuchPipeline"})
    assert "no pipeline class 'NoSuchPipeline'" in pipeline_class_problems(unknown_class)[0]
    assert weights_problems(SD) == []
    assert "unknown tiny model" in weights_problems(SD.model_copy(update={"source": "tiny://x"}))[0]
    empty = SD.model_copy(update={"source": str(tmp_path)})
    assert "no model_index.json" in weights_problems(empty)[0]
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    assert weights_problems(empty) == []

    class MissingBucket:
        def get_object(self, **_: Any) -> Any:
            raise RuntimeError("NoSuchKey")

    in_s3 = SD.model_copy(update={"source": "s3://weights/sd"})
    [problem] = weights_problems(in_s3, s3=MissingBucket())
    assert "cannot read s3://weights/sd/model_index.json" in problem
    cpu_only = [{"CPU": 2.0}]
    [problem] = placement_problems(SD.ray_actor_options(), cpu_only)
    assert "GPU 1" in problem and "--gpus 0" in problem
    assert placement_problems({"num_cpus": 1, "num_gpus": 0}, cpu_only) == []
    a10g = [{"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}]
    on_a100 = SD.model_copy(update={"accelerator_type": "A100"})
    [problem] = placement_problems(on_a100.ray_actor_options(), a10g)
    assert "accelerator_type:A100" in problem and "accelerator_type:A10G" in problem
    assert placement_problems(SD.ray_actor_options(), a10g) == []


class VersionedScheduler(FakeScheduler):
    """A fake scheduler of one model version: its results name it."""

    def __init__(self, version: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.version = version

    async def submit(self, job: ImageJob) -> ImageResult:
        result = await super().submit(job)
        return result.model_copy(update={"model_version": self.version})


def test_the_router_serves_the_live_version_and_404s_a_removed_model(tmp_path: Path) -> None:
    service = Service(tmp_path)
    body = {"prompt": "a cat", "model": "tiny-sd", "size": "64x64"}
    v2 = VersionedScheduler("2")
    live = {
        "tiny-sd": LiveModel(app="model-tiny-sd-v2", spec=SD.model_copy(update={"version": "2"}))
    }
    assert service.gateway.route_live_models(live, lambda _: LocalHandle(v2)) == ["tiny-sd"]
    answer = service.generate(body)
    assert answer.status_code == 200 and answer.headers["x-mediagate-model-version"] == "2"
    assert len(v2.jobs) == 1 and not service.scheduler.jobs
    closing = {"tiny-sd": live["tiny-sd"].model_copy(update={"accepting": False})}
    service.gateway.route_live_models(closing, lambda _: pytest.fail("not routed"))
    refused = service.generate(body)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    listed = service.client.get("/v1/models", headers=service.auth).json()
    assert [model["id"] for model in listed["data"]] == ["tiny-wan"]
    service.gateway.route_live_models({}, lambda _: pytest.fail("not routed"))
    assert service.generate(body).status_code == 200  # its built model again
    assert len(service.scheduler.jobs) == 1


async def test_a_request_refused_by_a_moved_version_goes_to_the_new_one() -> None:
    new = VersionedScheduler("2")
    schedulers: dict[str, Any] = {}

    class Old:
        async def submit(self, job: ImageJob) -> ImageResult:
            schedulers["tiny-sd"] = LocalHandle(new)  # the router hears of it meanwhile
            raise ModelMoved("moved")

    schedulers["tiny-sd"] = LocalHandle(Old())
    job = ImageJob(
        request_id="r",
        prompt="p",
        width=64,
        height=64,
        num_inference_steps=1,
        guidance_scale=1,
        num_images_per_prompt=1,
        seed=1,
        output_format="png",
    )
    result = await on_live_scheduler(
        lambda: schedulers, "tiny-sd", lambda live: live.submit.remote(job)
    )
    assert result.model_version == "2"
    stuck = {"tiny-sd": LocalHandle(Old())}
    with pytest.raises(ModelMoved):  # nobody took over within the wait: the refusal
        await on_live_scheduler(
            lambda: stuck, "tiny-sd", lambda live: live.submit.remote(job), wait_s=0.2
        )
    with pytest.raises(ModelRemoved):
        await on_live_scheduler(lambda: {}, "tiny-sd", lambda live: live.submit.remote(job))


async def test_a_caller_who_leaves_mid_swap_is_asked_of_the_version_holding_its_request(
    tmp_path: Path,
) -> None:
    """The id was routed on to a new version while the request ran on the old one: the
    old one says whether it had started (it had: charged), not the new one (which never
    saw it and would let it go uncharged)."""
    service = Service(tmp_path, tier="pro")
    old, new = service.scheduler, FakeScheduler()
    old.started_when_withdrawn = True
    forwarded = asyncio.Event()

    async def runs_until_the_caller_leaves(job: ImageJob) -> ImageResult:
        forwarded.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    old.submit = runs_until_the_caller_leaves  # type: ignore[method-assign]
    account = service.accounts.get_account("alice")
    assert account is not None
    request = asyncio.create_task(
        service.gateway.images.generate(
            account, ImageGenerationRequest(prompt="a cat"), request_id="r1", base_url="http://h"
        )
    )
    await asyncio.wait_for(forwarded.wait(), 10)
    service.gateway.schedulers["tiny-sd"] = LocalHandle(new)  # the swap's new route
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request
    assert (old.withdrawn, new.withdrawn) == (["r1"], [])
    assert (await service.gateway.guard.ledger.usage(account)).images_today == 1


def image_job(request_id: str) -> ImageJob:
    return ImageJob(
        request_id=request_id,
        prompt="p",
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=7.5,
        num_images_per_prompt=1,
        seed=1,
        output_format="png",
    )


async def one() -> int:
    return 1


@pytest.mark.parametrize("mode", ["moved", "removed"])
async def test_an_image_scheduler_leaving_service(mode: str) -> None:
    """Retired, it takes no new work; what runs finishes; what it queued is served
    (moved: its workers stay until then) or fails uncharged (removed)."""
    worker = FakeImageWorker()
    scheduler = Scheduler(LocalHandle(worker), SD, count_replicas=one, clock=FakeClock())
    scheduler.reconfigure({"batching": {"max_batch_size": 1}})
    running = asyncio.create_task(scheduler.submit(image_job("a")))
    await worker.started.wait()
    queued = asyncio.create_task(scheduler.submit(image_job("b")))
    await asyncio.sleep(0)
    scheduler.reconfigure({"batching": {"max_batch_size": 1}, "retired": mode})
    refused = ModelMoved if mode == "moved" else ModelRemoved
    with pytest.raises(refused):
        await scheduler.submit(image_job("c"))
    stats = scheduler.record_autoscaling_stats()
    assert stats["weighted_queue_len"] == stats["queue_len"]  # every class counts fully
    worker.release.set()
    assert (await running).request_id == "a"
    if mode == "moved":
        assert (await queued).request_id == "b"
    else:
        with pytest.raises(ModelRemoved):
            await queued
    await scheduler.shutdown()


async def test_a_video_scheduler_moved_leaves_its_queue_to_the_new_version(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    try:
        await rig.add("video_a")
        await rig.add("video_b")
        await rig.worker.wait_running(1)
        assert (await rig.job("video_a")).model_version == WAN.version
        rig.scheduler.reconfigure({"retired": "moved"})
        with pytest.raises(ModelMoved):
            await rig.scheduler.admit("acct", 0, 60, None)
        with pytest.raises(ModelMoved):  # the router hands it to the live version
            await rig.scheduler.enqueue("acct", "video_c")
        rig.worker.finish("video_a")
        await asyncio.sleep(0.05)
        await rig.scheduler.reconcile()
        assert rig.worker.running() == []  # b waits, queued in the store, for the new one
        assert (await rig.job("video_b")).status == "queued"
        assert rig.scheduler.record_autoscaling_stats()["retired"] == 1.0
    finally:
        await rig.scheduler.shutdown()


async def test_a_new_video_version_takes_no_queued_job_until_traffic_moves_to_it(
    tmp_path: Path,
) -> None:
    """A swap starts the new version in standby: a job queued in the store (the live
    version's) stays there, unclaimed and with its attempts untouched, until the route
    moves and standby is lifted; then the new version runs it."""
    rig = Rig(tmp_path, standby=True)
    try:
        await rig.add("video_waiting", enqueue=False)
        await rig.scheduler.reconcile()  # (the pass that would have enqueued and claimed it)
        waiting = await rig.job("video_waiting")
        assert (waiting.status, waiting.attempt, rig.worker.running()) == ("queued", 0, [])
        rig.scheduler.reconfigure({"standby": False})  # routed to it: lifted
        await rig.scheduler.reconcile()
        await rig.worker.wait_running(1)
        assert (await rig.job("video_waiting")).model_version == WAN.version
    finally:
        await rig.scheduler.shutdown()


def test_a_video_swap_starts_its_new_version_in_standby_and_lifts_it_in_place(
    tmp_path: Path,
) -> None:
    """The new version's scheduler starts in standby (an argument: it holds from the
    replica's first moment) and leaves it in the deploy that routes to it (a user_config
    override: that version is not restarted); the next swap's version starts in its own."""
    config = shipped(tmp_path)
    router = apps_by_name(config)["mediagate"]
    v2 = WAN.model_copy(update={"version": "2"})
    started = with_application(config, standing_by(model_application(router, v2), v2))
    assert apps_by_name(started)[app_name_of(v2)]["args"]["video"]["standby"] is True
    routed = out_of_standby(
        with_routes(started, {v2.id: LiveModel(app=app_name_of(v2), spec=v2)}),
        app_name_of(v2),
        v2,
    )
    [scheduler] = [
        entry
        for entry in apps_by_name(routed)[app_name_of(v2)]["deployments"]
        if entry["name"] == f"Scheduler-{v2.id}"
    ]
    assert scheduler["user_config"] == {"standby": False}
    assert code_versions(routed)[app_name_of(v2)] == code_versions(started)[app_name_of(v2)]
    carried = deployment_entries(routed, app_name_of(v2))
    assert all("standby" not in (entry.get("user_config") or {}) for entry in carried)
    image_app = model_application(router, SD)
    assert standing_by(image_app, SD) == image_app  # image schedulers hold no stored jobs


class ConfigOnly:
    """The part of ``Cluster`` a swap's clean-up uses: the deployed config, changed."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.deployed = config

    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self.deployed)

    def change(self, edit: Any) -> dict[str, Any]:
        self.deployed = edit(self.config())
        return self.deployed


def test_a_swap_stopped_before_traffic_moves_takes_its_new_version_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted (Ctrl-C, a dashboard error) between the new version's start and the
    route's move, a swap removes that version again, audited; once the route has moved
    it leaves it (the rest of the swap is to be re-run)."""
    from mediagate.cli.models import _withdraw_unrouted
    from mediagate.settings import get_settings

    monkeypatch.setenv("MEDIAGATE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        config = shipped(tmp_path)
        router = apps_by_name(config)["mediagate"]
        v2 = WAN.model_copy(update={"version": "2"})
        started = with_application(config, standing_by(model_application(router, v2), v2))
        cluster = ConfigOnly(started)
        _withdraw_unrouted(cluster, v2, app_name_of(v2), KeyboardInterrupt())  # type: ignore[arg-type]
        assert app_name_of(v2) not in apps_by_name(cluster.deployed)
        assert "removed again: the swap stopped" in (tmp_path / "home" / "audit.log").read_text()
        routed = with_routes(started, {v2.id: LiveModel(app=app_name_of(v2), spec=v2)})
        cluster = ConfigOnly(routed)
        _withdraw_unrouted(cluster, v2, app_name_of(v2), KeyboardInterrupt())  # type: ignore[arg-type]
        assert app_name_of(v2) in apps_by_name(cluster.deployed)
    finally:
        get_settings.cache_clear()


async def test_a_video_scheduler_adopts_no_run_of_another_version(tmp_path: Path) -> None:
    """Both versions of a model read its active jobs during a swap: a job the other
    version runs holds no slot here (the retired one would never drain, the new one
    would scale for work running elsewhere)."""
    rig = Rig(tmp_path)
    try:
        now = rig.clock()
        await rig.add(
            "video_elsewhere",
            enqueue=False,
            status="in_progress",
            attempt=1,
            model_version="0",
            lease_expires_at=now + 600,
            worker_started_at=now,
        )
        await rig.scheduler.reconcile()
        stats = rig.scheduler.record_autoscaling_stats()
        assert stats["inflight"] == 0.0 and "retired" not in stats
    finally:
        await rig.scheduler.shutdown()


def test_a_retired_versions_workers_stay_while_it_holds_work_then_go() -> None:
    from tests.unit.test_autoscaling_policy import decide, queue

    retired = {"retired": 1.0}
    # target 2 per replica: one request running would want 1 replica of the 6
    assert decide(6, queue(inflight=1), min_replicas=0) == 1  # in service: it shrinks
    assert decide(6, queue(inflight=1) | retired, min_replicas=0) == 6  # no busy one stopped
    assert decide(6, queue(free=1) | retired, min_replicas=0) == 6  # queued counts too
    assert decide(6, queue() | retired, min_replicas=0) == 0  # holds nothing: all go


async def test_a_video_scheduler_removed_fails_what_it_holds_uncharged(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        await rig.add("video_a")
        await rig.add("video_b")
        await rig.worker.wait_running(1)
        rig.scheduler.reconfigure({"retired": "removed"})
        for _ in range(200):
            jobs = [await rig.job(name) for name in ("video_a", "video_b")]
            if all(job.status == "failed" for job in jobs):
                break
            await asyncio.sleep(0.01)
        assert [(job.status, job.error_code) for job in jobs] == [("failed", "model_removed")] * 2
        # a job stored by a router that had not heard yet fails at the next pass
        await rig.add("video_late", enqueue=False)
        await rig.scheduler.reconcile()
        assert (await rig.job("video_late")).error_code == "model_removed"
    finally:
        await rig.scheduler.shutdown()


def test_a_live_model_entry_is_checked_data() -> None:
    with pytest.raises(ValueError):
        LiveModel.model_validate({"app": "", "spec": SD.model_dump()})
    with pytest.raises(ValueError):
        ModelSpec.model_validate({**SD.model_dump(), "version": "has space"})
