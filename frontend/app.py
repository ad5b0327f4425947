"""What ``main.py`` does: settings in, then a queue, a saved JSON, or a training.

User mistakes end here as one line each on stderr and exit code 2, with nothing written; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Iterator

from sd_scripts.core.errors import EXIT_USER_ERROR, ConfigError, UserError, UserErrors

from .cli import parse_command_line

if TYPE_CHECKING:
    from .resolve import Resolved

__all__ = ["run_main", "print_user_error"]


def _note(text: str) -> None:
    print(text if text.startswith(("note:", "warning:")) else f"note: {text}", flush=True)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def print_user_error(err: UserError) -> None:
    from .settings_map import NAME_MAP

    from ArgsList import ArgStore

    infos = {info.name: info for info in ArgStore.settings()}
    reverse: dict[str, str] = {}
    for ours, kohya in NAME_MAP.items():  # the first wins: resolution is train_resolution, not height_resolution
        if kohya != ours and kohya not in infos and not (ours in infos and infos[ours].deprecated):
            reverse.setdefault(kohya, ours)
    errors = err.errors if isinstance(err, UserErrors) else [err]
    for item in errors:
        text = str(item)
        ours = reverse.get(getattr(item, "setting", None) or "")
        if ours and not text.startswith(ours):
            text += f" (in ArgsList.py and JSON files: {ours})"
        print(f"error: {text}", file=sys.stderr, flush=True)


def _wizard(cli_values: dict) -> Any:
    """The guided wizard of ``popups``, when it is installed; None if the user cancelled."""
    try:
        import popups
    except ImportError:
        popups = None
    wizard = getattr(popups, "run_training_wizard", None)
    if wizard is None:
        raise ConfigError("--popup: the guided wizard is not available in this version yet; edit ArgsList.py, "
                          "load a JSON file (--load_json_path) or pass settings as flags", setting="popup")
    from .resolve import resolve_settings

    defaults = resolve_settings(cli_values).store
    return wizard(defaults)


def _resolve(cli_values: dict, modes: dict) -> Resolved | None:
    # imported here, after the command line is read: -h answers without the JSON readers and the rules
    from .resolve import Resolved, resolve_settings

    if modes.get("popup") and not cli_values.get("load_json_path"):
        store = _wizard(cli_values)
        return None if store is None else Resolved(store=store)
    return resolve_settings(cli_values)


def run_main(argv: list[str] | None = None) -> int:
    cli_values, modes = parse_command_line(argv)
    try:
        resolved = _resolve(cli_values, modes)
        if resolved is None:
            print("cancelled; nothing was trained", flush=True)
            return 1
        for note in resolved.notes:
            _note(note)
        for warning in resolved.warnings:
            _warn(warning)
        store = resolved.store
        if store.multi_run_folder:
            from .job_queue import queue_lock, run_queue

            with queue_lock(store.multi_run_folder) as folder, _status_page(store):
                return run_queue(folder, cli_values, locked=True)
        if store.save_json_only and not store.save_json_folder:
            raise ConfigError("save_json_only: set save_json_folder (--save_json_path) so there is somewhere to "
                              "save the JSON", setting="save_json_only")
        from .resolve import validate_store

        validate_store(store)
        if store.save_json_only:
            _save_json(store)
            print("save_json_only is set: not training", flush=True)
            return 0
        # The JSON saved is what the user asked for, before any fallback for this machine.
        save = (lambda _effective: _save_json(store)) if store.save_json_folder else None
        with _status_page(store):
            _train_with_status(store, save)
        return 0
    except UserError as err:
        print_user_error(err)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nstopped by Ctrl+C", file=sys.stderr, flush=True)
        return 130


def _train_with_status(store: Any, before_train: Any) -> None:
    """Train, keeping ``<output_folder>/<output_name>_status.json`` up to date (queue_status.py)."""
    from sd_scripts.training.callbacks import ConsoleCallbacks

    from .queue_status import RunStatusCallbacks
    from .settings_map import output_name_of
    from .training import is_main_process, run_training

    if not is_main_process():
        run_training(store, before_train=before_train)
        return
    status = RunStatusCallbacks(ConsoleCallbacks(stream=sys.stderr), store.output_folder, output_name_of(store))
    try:
        run_training(store, before_train=before_train, callbacks=status)
    except KeyboardInterrupt:
        status.finish("stopped", "stopped by Ctrl+C")
        raise
    except BaseException as err:
        status.finish("failed", " ".join(str(err).split())[:300] or type(err).__name__)
        raise
    status.finish("complete")


@contextlib.contextmanager
def _status_page(store: Any) -> Iterator[None]:
    """The status page (``status_port``) while the queue or the training runs."""
    from .status_page import start_status_page

    page = start_status_page(store)
    try:
        yield
    finally:
        if page is not None:
            page.close()


def _save_json(store: Any) -> str | None:
    from .json_io import save_settings_json
    from .training import is_main_process

    if not is_main_process():
        return None
    path = save_settings_json(store, store.save_json_folder, store.save_json_name)
    print(f"settings saved to {path}", flush=True)
    return path
