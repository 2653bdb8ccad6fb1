# Copyright 2026 The enat-diffusers authors. Licensed under the Apache License, Version 2.0.
"""
What every command-line tool of enat-diffusers (the converter, `examples/*.py`, the Shapes CLIs) shares.

**Errors.** A mistake the user can fix (a bad argument, a folder that is not a pipeline, an unreadable image, a full
disk, `--device cuda` without CUDA) ends the tool with one line, `error: ...`, and exit status 1 (`report_errors`,
`run_cli`); `--debug` shows the traceback instead.

**Output folders.** One policy for every tool (`check_output_dir`, `OutputFolder`, `write_atomically`):

- checked before any work starts: not a file, not under a file, writable, never the inputs or a folder holding them,
  never an existing pipeline or model folder unless the tool's job is to update it;
- written atomically: into a hidden staging folder first, then renamed into place;
- `--overwrite` replaces only what the run itself writes, and removes the run's stale files of the same kind (the
  images of an earlier, longer run, say);
- one run at a time: a lock file refuses a second run into the same folder while the first one is alive.
"""

import argparse
import contextlib
import errno
import fnmatch
import inspect
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Union

import PIL.Image
import torch
from safetensors import SafetensorError


PathLike = Union[str, os.PathLike]

LOCK_NAME = ".enat-diffusers.lock"
STAGING_PREFIX = ".staging-"


class UsageError(ValueError):
    """A mistake the user can fix (an argument, a file, a folder); command-line tools print it as one line."""


# What a user can cause from the command line: bad values (ValueError, TypeError: the pipelines' input checks), files
# and folders (OSError, corrupt safetensors), images too large to decode, memory for a too large batch.
USER_ERRORS = (
    UsageError,
    ValueError,
    TypeError,
    OSError,
    SafetensorError,
    PIL.Image.DecompressionBombError,
    MemoryError,
    torch.OutOfMemoryError,
)


def error_line(error: BaseException) -> str:
    """`error` as one line: an OSError as "reason: file", anything else as its message with whitespace folded."""
    if isinstance(error, OSError) and error.strerror:
        message = error.strerror + (f": {error.filename}" if error.filename else "")
        if error.errno == errno.ENOSPC:
            message += " (the disk is full)"
    else:
        message = str(error) or type(error).__name__
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        message = f"out of memory ({message}); try a smaller batch"
    return " ".join(message.split())


@contextlib.contextmanager
def report_errors(debug: bool = False):
    """Turns the errors a user can cause into `error: <one line>` and exit status 1 (or re-raises with `debug`)."""
    try:
        yield
    except USER_ERRORS as error:
        if debug:
            raise
        sys.exit(f"error: {error_line(error)}")


def run_cli(main: Callable, parse_args: Callable, argv: Optional[Sequence[str]] = None):
    """`main(parse_args(argv))` with `report_errors`: argument checks that raise are one line too."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with report_errors(debug="--debug" in argv):
        return main(parse_args(argv))


def add_debug_argument(parser):
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")


def run_parser(parser, run: Callable, argv: Optional[Sequence[str]] = None, add_debug: bool = True):
    """Parses `argv` with `parser` (adding `--debug` unless `add_debug=False`: subcommands add their own) and
    returns `run(args)`, with the errors a user can cause as one line."""
    if add_debug:
        add_debug_argument(parser)
    args = parser.parse_args(argv)
    with report_errors(args.debug):
        return run(args)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


# ------------------------------------------------------------------------------------------------------- inputs


def add_sampling_arguments(parser):
    """The sampling options of the tools that run a pipeline; `sampling_kwargs(args)` passes them to it."""
    parser.add_argument("--steps", type=positive_int, default=None, help="decoding steps (default: the scheduler's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's setting; 0 = off")
    parser.add_argument("--mask-temperature", type=float, default=None, help="default: the model's setting")
    parser.add_argument("--sampling-temperature", type=float, default=None, help="default: the model's setting")
    parser.add_argument("--no-reuse", action="store_true", help="re-encode every visible token at every step")


def sampling_kwargs(args) -> dict:
    """The pipeline arguments of `add_sampling_arguments`' options (None: the pipeline's default)."""
    return dict(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        mask_temperature=args.mask_temperature,
        sampling_temperature=args.sampling_temperature,
        reuse_features=False if args.no_reuse else None,  # None: reuse where the model has it (ENAT)
    )


def resolve_device(name: Optional[str], flag: str = "--device") -> str:
    """The device to run on: `name`, checked, or CUDA when there is one and the CPU otherwise."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"{flag} {name!r} is not a device: {error}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise UsageError(f"{flag} {name}: CUDA is not available ({reason}); use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS is not available here; use {flag} cpu")
    return name


def open_image(path: PathLike, flag: str, mode: str = "RGB") -> PIL.Image.Image:
    """The image at `path`, loaded and converted to `mode`; a missing, unreadable or oversized file is a UsageError
    that names `flag`."""
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except PIL.Image.DecompressionBombError as error:
        raise UsageError(f"{flag} {path} is too large to decode safely: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises SyntaxError for some broken files
        raise UsageError(f"{flag} {path} cannot be read as an image: {error_line(error)}") from None


def is_local_path(name: str) -> bool:
    """Whether `name` can only mean a local path (a Hub repo id is `name` or `owner/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_config_types(config: dict, cls, where: str):
    """Refuses config values of the wrong type (`"hidden_size": "128"`) before `cls` is built from them: the type of
    each constructor argument is taken from its default (an int, a float or a bool)."""
    try:
        parameters = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    for key, value in config.items():
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if value is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, bool):
            expected, ok = "true or false", isinstance(value, bool)
        elif isinstance(default, int):
            expected, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            expected, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            continue
        if not ok:
            raise UsageError(f"{where}: {key} must be {expected}, got {value!r}")


def _check_component_config(folder: Path, component: str, library: str, class_name: str):
    config_file = folder / component / ("scheduler_config.json" if "Scheduler" in class_name else "config.json")
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UsageError(f"{config_file} is not valid JSON: {error_line(error)}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_file} is not a JSON object")
    try:
        cls = getattr(__import__(library, fromlist=[class_name]), class_name)
    except (ImportError, AttributeError):
        return  # a class this check does not know: diffusers reports it
    check_config_types(config, cls, str(config_file))


def load_pipeline(pipeline_class, model: str, flag: str = "--model", **kwargs):
    """`pipeline_class.from_pretrained(model, **kwargs)`, with a UsageError naming `flag` for a folder that is not a
    pipeline, config values of the wrong type, or anything else that stops it from loading."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {model} is a file, not a pipeline folder")
        index_file = path / "model_index.json"
        if not index_file.is_file():
            hint = " (it looks like one component of a pipeline: pass its parent folder)"
            hint = hint if (path / "config.json").is_file() or (path / "scheduler_config.json").is_file() else ""
            raise UsageError(f"{flag} {model} is not a pipeline folder: it has no model_index.json{hint}")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UsageError(f"{index_file} is not valid JSON: {error_line(error)}") from None
        for component, entry in index.items() if isinstance(index, dict) else ():
            if isinstance(entry, list) and len(entry) == 2 and all(isinstance(item, str) for item in entry):
                _check_component_config(path, component, *entry)
    elif is_local_path(model):
        raise UsageError(f"{flag} {model}: no such folder")
    try:
        return pipeline_class.from_pretrained(model, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, SafetensorError) as error:
        raise UsageError(f"cannot load the pipeline {model}: {error_line(error)}") from error


# ---------------------------------------------------------------------------------------------- output folders


def model_folder_kind(folder: Path) -> Optional[str]:
    """ "a pipeline folder" or "a model folder" when `folder` holds a saved pipeline or model, else None."""
    if (folder / "model_index.json").is_file():
        return "a pipeline folder"
    if (folder / "config.json").is_file() or (folder / "scheduler_config.json").is_file():
        return "a model folder"
    return None


def _nearest_existing(path: Path) -> Path:
    return next(p for p in [path, *path.parents] if p.exists() or p.is_symlink())


def _probe_writable(folder: Path) -> Optional[str]:
    """None when a file can be created in `folder`, else the reason (read-only folder or file system, no room)."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return error_line(error)
    return None


def check_output_dir(
    output_dir: PathLike,
    inputs: Iterable[Optional[PathLike]] = (),
    flag: str = "--output-dir",
    allow_model_folder: bool = False,
) -> Path:
    """
    Refuses, before any work starts, an output folder that:

    - is a file, or lies under a file;
    - cannot be written (the folder, or the nearest existing folder above it when it does not exist yet);
    - is one of `inputs` or contains one (an output folder may never hold the inputs of its run);
    - is an existing pipeline or model folder, unless `allow_model_folder` (for the tools whose job is to update it).

    Returns `output_dir` as a `Path`.
    """
    output_dir = Path(output_dir)
    if output_dir.is_symlink() and not output_dir.exists():
        raise UsageError(f"{flag} {output_dir} is a broken link")
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"{flag} {output_dir} exists and is a file, not a folder")
    existing = _nearest_existing(output_dir.absolute())
    if not existing.is_dir():
        raise UsageError(f"{flag} {output_dir} cannot be created: {existing} is a file, not a folder")
    target = output_dir.resolve()
    for path in inputs:
        if path is None or not Path(path).expanduser().exists():
            continue  # not given, or a Hub repo id
        resolved = Path(path).expanduser().resolve()
        if resolved == target or target in resolved.parents:
            raise UsageError(
                f"{flag} {output_dir} {'is' if resolved == target else 'contains'} the input {path}: an output "
                "folder may never hold a run's inputs; choose another folder"
            )
    kind = model_folder_kind(output_dir) if output_dir.is_dir() else None
    if kind and not allow_model_folder:
        raise UsageError(f"{flag} {output_dir} is {kind}; this tool does not write into one: choose another folder")
    problem = _probe_writable(existing)  # last: it creates (and removes) a file there
    if problem:
        where = "" if existing == output_dir.absolute() else f" (in {existing})"
        raise UsageError(f"{flag} {output_dir} cannot be written{where}: {problem}")
    return output_dir


def check_output_file(
    path: PathLike, inputs: Iterable[Optional[PathLike]] = (), flag: str = "--output", overwrite: bool = False
) -> Path:
    """The output-folder policy for a single output file: its folder exists and is writable, the file is not a
    folder, not one of `inputs`, and does not exist unless `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} exists; pass --overwrite to replace it, or another {flag}")
    if not path.absolute().parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist")
    problem = _probe_writable(path.absolute().parent)
    if problem:
        raise UsageError(f"{flag} {path} cannot be written: {problem}")
    for other in inputs:
        if other is not None and Path(other).exists() and Path(other).resolve() == path.resolve():
            raise UsageError(f"{flag} {path} is an input of this run; choose another file")
    return path


def write_file_atomically(path: PathLike, write: Callable[[Path], None]):
    """`write(temporary_path)` next to `path`, then a rename onto it: an interrupted run never leaves a partial
    file, and a reader sees the old file or the new one."""
    path = Path(path)
    # the temporary name keeps the suffix: numpy's savers append theirs to a name without it
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.absolute().parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_json_atomically(path: PathLike, data, indent: int = 2):
    """`data` as JSON (UTF-8, a final newline) at `path`, through `write_file_atomically`."""
    text = json.dumps(data, indent=indent, ensure_ascii=False) + "\n"
    write_file_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


class OutputLock:
    """
    Refuses a second run into a folder: a lock file created exclusively in the folder, holding the owner's process
    id and host, removed when the run ends. A lock left by a process of this host that no longer exists (a killed
    run) is taken over.
    """

    def __init__(self, folder: PathLike, what: Optional[str] = None, path: Optional[PathLike] = None):
        self.folder = Path(folder)
        self.what = what or str(self.folder)
        self.path = Path(path) if path is not None else self.folder / LOCK_NAME
        self.held = False

    def _owner(self) -> Optional[dict]:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _alive(self, owner: dict) -> bool:
        if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return True  # another machine's (or an unreadable) lock: assume its run goes on
        try:
            os.kill(owner["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released meanwhile
                if self._alive(owner):
                    started = owner.get("started")
                    since = time.strftime(" since %H:%M:%S", time.localtime(started)) if started else ""
                    raise UsageError(
                        f"another run (process {owner.get('pid', '?')} on {owner.get('host', '?')}{since}) is writing "
                        f"into {self.what}; wait for it to end or choose another folder (if no such run "
                        f"exists, delete {self.path})"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()  # its run is gone
                continue
            with os.fdopen(handle, "w") as file:
                file.write(record)
            self.held = True
            return self
        raise UsageError(f"cannot lock {self.folder}: {self.path} keeps changing")

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def move_into_place(source: Path, target: Path):
    """Renames `source` onto `target`; a folder already at `target` is renamed aside first and deleted after."""
    if target.is_dir() and not target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        aside.rmdir()
        target.rename(aside)
        try:
            source.rename(target)
        except BaseException:
            aside.rename(target)
            raise
        shutil.rmtree(aside)
    else:
        os.replace(source, target)


def new_staging_dir(folder: Path, name: Optional[str] = None) -> Path:
    """A hidden, empty staging folder inside `folder` (created with it), with the permissions of the umask; `name`
    gives it a known name (`.staging-<name>`, for several processes writing into it; an old one is emptied)."""
    folder.mkdir(parents=True, exist_ok=True)
    if name is None:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    else:
        staging = folder / f"{STAGING_PREFIX}{name}"
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed (the lock is ours)
        staging.mkdir()
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def commit_staging_dir(staging: Path, folder: Path) -> List[str]:
    """Moves every entry of `staging` into `folder` (one rename each), removes `staging`; returns the names."""
    names = sorted(entry.name for entry in staging.iterdir())
    for name in names:
        move_into_place(staging / name, folder / name)
    staging.rmdir()
    return names


def is_bookkeeping(name: str) -> bool:
    """The lock and staging entries these tools keep in an output folder while they run."""
    return name == LOCK_NAME or name.startswith(STAGING_PREFIX)


class OutputFolder:
    r"""
    The files one run of a tool writes into a folder, under the output-folder policy.

    Args:
        folder: the output folder.
        kinds (`Sequence[str]`): glob patterns of the files the tool writes (`image_*.png`, `grid.png`, ...). Files of
            these kinds already in the folder are refused unless `overwrite`; with it, those this run does not write
            again are removed at the end (they would be stale).
        inputs: the run's input paths (never inside the folder).
        overwrite (`bool`): replace earlier outputs of the kinds.
        flag (`str`): the option's name, for messages.
        staging_name (`str`, *optional*): a known name for the staging folder, for processes that write into it
            without holding this object (`new_staging_dir`).

    `check()` runs every check (call it before any work); `with folder:` takes the lock and a staging folder;
    `folder.path(name)` is where to write `name`; leaving the block without an error moves every staged file into
    place and removes stale ones, with an error it removes the staging folder (and the folder if this run created
    it and it is empty).
    """

    def __init__(
        self,
        folder: PathLike,
        kinds: Sequence[str],
        inputs=(),
        overwrite=False,
        flag="--output-dir",
        staging_name=None,
    ):
        self.folder, self.kinds, self.inputs = Path(folder), tuple(kinds), tuple(inputs)
        self.overwrite, self.flag, self.staging_name = overwrite, flag, staging_name
        self.staging = self.lock = None
        self.created = False

    def existing(self) -> List[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if any(fnmatch.fnmatch(p.name, k) for k in self.kinds))

    def check(self):
        check_output_dir(self.folder, self.inputs, self.flag)
        existing = self.existing()
        if existing and not self.overwrite:
            raise UsageError(
                f"{existing[0]} exists; pass --overwrite (replaces only the files this tool writes) or another "
                f"{self.flag}"
            )
        return self

    def __enter__(self):
        self.check()
        self.created = not self.folder.exists()
        self.lock = OutputLock(self.folder, f"{self.flag} {self.folder}").acquire()
        try:
            self.staging = new_staging_dir(self.folder, self.staging_name)
        except BaseException:
            self._clean_up()
            raise
        return self

    def path(self, name: str) -> Path:
        if not any(fnmatch.fnmatch(name, kind) for kind in self.kinds):
            raise ValueError(f"{name} is not one of the kinds of this output folder: {self.kinds}")
        return self.staging / name

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is None:
                written = set(commit_staging_dir(self.staging, self.folder))
                self.staging = None
                for stale in self.existing():
                    if stale.name not in written:
                        stale.unlink()
        finally:
            self._clean_up()

    def _clean_up(self):
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


# ------------------------------------------------------------------------------------ replacing a whole folder


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turns SIGTERM into KeyboardInterrupt while saving, so that the staging folder is cleaned up as on Ctrl-C."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_atomically(output_dir: Path, save: Callable[[Path], None]):
    """Calls `save(staging_dir)`, then moves the result to `output_dir`; an existing folder is deleted only after the
    new one is in place. Folders get the permissions of the user's umask."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    umask = _umask()
    # one run at a time replaces the folder: the lock is a sibling, as the folder itself is swapped
    lock = OutputLock(output_dir.parent, str(output_dir), output_dir.parent / f".{output_dir.name}.lock")
    with sigterm_as_interrupt(), lock:
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
        old = None
        try:
            os.chmod(staging, 0o777 & ~umask)
            save(staging)
            if output_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old.", dir=output_dir.parent))
                old.rmdir()
                output_dir.rename(old)
            staging.rename(output_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if old is not None and not output_dir.exists():
                old.rename(output_dir)  # put the previous folder back
            raise
    if old is not None:
        shutil.rmtree(old)
