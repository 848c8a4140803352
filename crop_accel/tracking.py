"""Weights & Biases tracking through accelerate's own wandb tracker.

W&B must never stop or hang training: a run that fails to start leaves tracking
disabled, and the first failed call during training disables it for the rest of the run.
Both are logged as warnings. Only the main process starts a W&B run.
"""

from __future__ import annotations

import argparse
import logging
import netrc
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from crop_accel.analysis import Analysis
from crop_accel.plots import atomic_output
from crop_accel.wandb_media import analysis_payload, lr_finder_payload

logger = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
# Legacy spellings that wandb itself still accepts in WANDB_MODE.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}

DEFAULT_WANDB_HOST = "https://api.wandb.ai"
DEFAULT_PROJECT = "crop_accel"
# Seconds that wandb.init and the W&B login may wait for the server before raising, unless
# WANDB_INIT_TIMEOUT or WANDB_LOGIN_TIMEOUT set another bound. wandb 0.31 itself waits 90 s
# in init and has no login bound.
DEFAULT_TIMEOUT_S = 60.0
RUN_ID_FILE = "wandb_run_id.txt"
# The files of a trained model, as written by crop_accel.export.
MODEL_FILES = ("model.safetensors", "model.json")
# wandb 0.31 rejects tags longer than this.
MAX_TAG_LENGTH = 64


def resolve_wandb_mode(requested: str | None = None) -> str:
    """Return ``online``, ``offline`` or ``disabled`` for the W&B run.

    Without ``requested``, WANDB_MODE decides when it is set. Otherwise the mode is
    ``online`` when W&B credentials are found and ``offline`` when they are not.
    """
    source = "--wandb-mode"
    if requested is None and os.environ.get("WANDB_MODE"):
        requested, source = os.environ["WANDB_MODE"], "WANDB_MODE"
    if requested is None:
        return "online" if has_wandb_credentials() else "offline"

    mode = requested.strip().lower()
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in WANDB_MODES:
        raise ValueError(f"invalid W&B mode {requested!r} from {source}; use one of {', '.join(WANDB_MODES)}")
    return mode


def has_wandb_credentials() -> bool:
    """Check for a W&B API key in WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or the netrc file.

    The netrc file is NETRC when set, else ~/.netrc, and must have an entry for the host of
    WANDB_BASE_URL (default api.wandb.ai), as wandb itself looks it up.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    netrc_path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST).netloc
    try:
        entry = netrc.netrc(netrc_path).authenticators(host)
    except (OSError, netrc.NetrcParseError) as error:
        logger.debug("Found no W&B credentials in %s: %s", netrc_path, error)
        return False
    return bool(entry and entry[2])


def log_with_for(mode: str) -> str | None:
    """Return the ``log_with`` value for ``Accelerator`` in this W&B mode."""
    return None if mode == "disabled" else "wandb"


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the W&B options (--wandb-mode, --wandb-project, ...) to ``parser``."""
    group = parser.add_argument_group("Weights & Biases")
    group.add_argument(
        "--wandb-mode", choices=WANDB_MODES, default=None,
        help="where the run is logged (default: WANDB_MODE if set, else online when W&B credentials "
        "are found, else offline; upload an offline run later with `wandb sync`)",
    )
    group.add_argument(
        "--wandb-project", type=_project_name, default=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        help="W&B project (default: WANDB_PROJECT, else %(default)s)",
    )
    group.add_argument("--wandb-entity", default=None, help="W&B user or team that owns the run (default: WANDB_ENTITY, else your default entity)")
    group.add_argument("--run-name", default=None, help="display name of the W&B run (default: a generated name)")
    group.add_argument("--wandb-tags", type=_tag_list, default=[], help="comma-separated tags for the W&B run, for example 'baseline,lite0'")
    group.add_argument("--log-model", action="store_true", help="upload the best model folder to W&B as a model artifact")


class RunTracking:
    """A W&B run started by ``start``, whose methods do nothing once tracking is off.

    Tracking is off in a ``DisabledTracking``, after ``finish`` and after the first W&B
    failure, so the training loop can call these methods without checks.
    """

    def __init__(self, accelerator, run, log_model: bool):
        self._accelerator = accelerator
        self._run = run
        self._log_model = log_model
        self._failed = False
        # Kept after finish, so the training summary can still name the run.
        self.run_id: str | None = None if run is None else run.id

    @property
    def enabled(self) -> bool:
        return not self._failed and self._run is not None

    @classmethod
    def start(
        cls, accelerator, args: argparse.Namespace, config: dict, output_dir: str | Path, *, resume: bool = False
    ) -> RunTracking:
        """Start the W&B run through ``accelerator.init_trackers`` on the main process.

        With ``resume`` and a run id stored in ``output_dir`` by an earlier start, the same
        W&B run continues. Any failure to start is logged, and tracking is disabled.
        """
        mode = resolve_wandb_mode(args.wandb_mode)
        if mode == "disabled" or not accelerator.is_main_process:
            return DisabledTracking()
        if not any(str(tracker) == "wandb" for tracker in accelerator.log_with):
            logger.warning(
                "W&B mode is %s but the Accelerator was built without log_with='wandb', so tracking is disabled; "
                "build it with log_with=log_with_for(mode)", mode,
            )
            return DisabledTracking()

        output_dir = Path(output_dir)
        try:
            init_kwargs = _init_kwargs(args, mode, output_dir, _stored_run_id(output_dir) if resume else None)
            accelerator.init_trackers(args.wandb_project, config=_plain(config), init_kwargs={"wandb": init_kwargs})
            run = accelerator.get_tracker("wandb", unwrap=True)
        except Exception as error:
            hint = " Raise WANDB_INIT_TIMEOUT (seconds) for a slow server, or use --wandb-mode offline." if mode == "online" else ""
            logger.warning(
                "Failed to start the W&B run in %s mode (%s: %s); training continues without W&B tracking.%s",
                mode, type(error).__name__, error, hint,
            )
            _detach_wandb(accelerator, finish=True)
            return DisabledTracking()

        _store_run_id(output_dir, run.id)
        resumed = " (resumed)" if "id" in init_kwargs else ""
        location = run.url if mode == "online" else run.settings.sync_dir
        logger.info("W&B run %s started in %s mode%s: %s", run.id, mode, resumed, location)
        return cls(accelerator, run, log_model=bool(getattr(args, "log_model", False)))

    def log(self, metrics: dict, step: int) -> None:
        """Log scalar ``metrics`` at ``step``, which must not decrease because W&B drops older steps."""
        self._call("logging metrics", lambda: self._run.log(_plain(metrics), step=step))

    def log_analysis(self, analysis: Analysis, step: int, data_dir: str | Path, prefix: str = "val") -> None:
        """Log the per-class table, confusion charts, confused pairs and worst-error gallery."""
        self._log_built("the analysis", lambda: analysis_payload(analysis, Path(data_dir), prefix), step)

    def log_lr_finder(self, csv_path: str | Path, png_path: str | Path, step: int = 0) -> None:
        """Log the LR finder's CSV (columns ``lr`` and ``loss``) as a table and chart, and its PNG."""
        self._log_built("the LR finder results", lambda: lr_finder_payload(Path(csv_path), Path(png_path)), step)

    def log_model_artifact(self, model_dir: str | Path, aliases: tuple[str, ...] = ("best",)) -> None:
        """Upload ``model_dir`` as a ``model`` artifact when --log-model was given."""
        if not self.enabled or not self._log_model:
            return
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            logger.warning("Model folder %s not found; no model artifact is logged", model_dir)
            return
        self._call("logging the model artifact", lambda: self._upload_model(model_dir, aliases))

    def finish(self) -> None:
        """Close the W&B run, then log where an offline run is stored and how to upload it."""
        if self._run is None:
            return
        run, self._run = self._run, None
        _detach_wandb(self._accelerator, finish=False)
        try:
            run.finish()
        except Exception as error:
            logger.warning("Failed to finish W&B run %s: %s", run.id, error)
        if run.settings.mode in ("offline", "dryrun"):
            sync_dir = run.settings.sync_dir
            logger.info("W&B offline run %s is saved in %s; upload it with `wandb sync %s`", run.id, sync_dir, sync_dir)
            # A resumed run writes a new offline folder for the same run id; all of them belong together.
            parts = sorted(Path(sync_dir).parent.glob(f"offline-run-*-{run.id}"))
            if len(parts) > 1:
                pattern = Path(sync_dir).parent / f"offline-run-*-{run.id}"
                logger.info("This run has %d offline parts from resumes; upload all with `wandb sync %s`", len(parts), pattern)

    def _upload_model(self, model_dir: Path, aliases: tuple[str, ...]) -> None:
        import wandb

        artifact = wandb.Artifact(f"model-{self._run.id}", type="model", metadata={"source_dir": str(model_dir)})
        # A training output dir also holds checkpoints and W&B files; upload only the model.
        model_files = [model_dir / name for name in MODEL_FILES if (model_dir / name).is_file()]
        if model_files:
            for path in model_files:
                artifact.add_file(str(path))
        else:
            artifact.add_dir(str(model_dir))
        self._run.log_artifact(artifact, aliases=list(aliases))

    def _log_built(self, description: str, build: Callable[[], dict[str, Any]], step: int) -> None:
        # A payload that cannot be built (a bad CSV, a plot error) skips this one call but,
        # unlike a W&B failure, leaves tracking on.
        if not self.enabled:
            return
        try:
            payload = build()
        except Exception:
            logger.warning("Failed to prepare %s for W&B, and none of it is logged", description, exc_info=True)
            return
        self._call(f"logging {description}", lambda: self._run.log(payload, step=step))

    def _call(self, action: str, function: Callable[[], Any]) -> None:
        if not self.enabled:
            return
        try:
            function()
        except Exception as error:
            self._failed = True
            logger.warning(
                "W&B failed while %s (%s: %s); W&B tracking is off for the rest of this run",
                action, type(error).__name__, error, exc_info=True,
            )


class DisabledTracking(RunTracking):
    """Tracking without a W&B run, for disabled W&B, a failed start and non-main processes."""

    def __init__(self):
        super().__init__(accelerator=None, run=None, log_model=False)


def _init_kwargs(args: argparse.Namespace, mode: str, output_dir: Path, run_id: str | None) -> dict[str, Any]:
    import wandb

    timeouts = {
        "init_timeout": float(os.environ.get("WANDB_INIT_TIMEOUT") or DEFAULT_TIMEOUT_S),
        "login_timeout": float(os.environ.get("WANDB_LOGIN_TIMEOUT") or DEFAULT_TIMEOUT_S),
    }
    kwargs: dict[str, Any] = {
        "mode": mode,
        "entity": args.wandb_entity,
        "name": args.run_name,
        "tags": list(args.wandb_tags) or None,
        "job_type": "train",
        "settings": wandb.Settings(**timeouts),
    }
    # Without WANDB_DIR the run's files go to output_dir/wandb, next to the checkpoints,
    # instead of ./wandb in whatever folder training was launched from.
    if not os.environ.get("WANDB_DIR"):
        output_dir.mkdir(parents=True, exist_ok=True)
        kwargs["dir"] = str(output_dir)
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    return kwargs


def _stored_run_id(output_dir: Path) -> str | None:
    path = output_dir / RUN_ID_FILE
    try:
        run_id = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        logger.info("No %s found; the resumed training starts a new W&B run", path)
        return None
    return run_id or None


def _store_run_id(output_dir: Path, run_id: str) -> None:
    try:
        with atomic_output(output_dir / RUN_ID_FILE) as temporary:
            temporary.write_text(run_id + "\n", encoding="utf-8")
    except OSError as error:
        logger.warning("Failed to store W&B run id %s in %s, so a resumed training starts a new run: %s", run_id, output_dir, error)


def _detach_wandb(accelerator, finish: bool) -> None:
    # accelerate keeps the tracker even when its start failed, and Accelerator.log or
    # end_training would then call a run that does not exist.
    for tracker in [t for t in accelerator.trackers if t.name == "wandb"]:
        accelerator.trackers.remove(tracker)
        run = getattr(tracker, "run", None)
        if finish and run is not None:
            try:
                run.finish(exit_code=1)
            except Exception as error:
                logger.warning("Failed to close the half-started W&B run: %s", error)


def _plain(value: Any) -> Any:
    """Convert paths, numpy scalars and 0-d tensors to JSON-friendly Python values."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    return value


def _project_name(value: str) -> str:
    # The characters and length that wandb 0.31 rejects in project names.
    forbidden = sorted(set(value) & set("/\\#?%:"))
    if not value or len(value) > 128 or forbidden:
        raise argparse.ArgumentTypeError(
            f"invalid W&B project {value!r}: use 1 to 128 characters without / \\ # ? % :"
        )
    return value


def _tag_list(value: str) -> list[str]:
    tags = [tag.strip() for tag in value.split(",") if tag.strip()]
    too_long = [tag for tag in tags if len(tag) > MAX_TAG_LENGTH]
    if too_long:
        raise argparse.ArgumentTypeError(f"W&B tags must be at most {MAX_TAG_LENGTH} characters; shorten {too_long[0]!r}")
    return tags
