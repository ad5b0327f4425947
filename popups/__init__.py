"""The guided wizard: questions in windows that fill the same settings the command line does.

* ``python main.py --popup`` -> :func:`run_training_wizard` (``training_flow``): an ``ArgStore``, or
  None when cancelled; ``main.py`` then trains, saves the JSON or runs the queue as usual.
* ``python scripts/<tool>.py --popup`` -> ``popups.<tool>.ask_arguments()``: the tool's command-line
  arguments, or None when cancelled (``lora_resize``, ``lora_merge``, ``locon_extract``,
  ``locon_loha_merge``, ``image_resize``, ``tag_images``, ``edit_tags``, ``dataset_report``, ``caption_images``).

Each flow is plain Python that asks through an :class:`~popups.asker.Asker`; ``tk_asker`` shows the
questions in tkinter windows and ``asker.ScriptedAsker`` answers them in tests. Nothing here
imports torch or diffusers, and tkinter is imported only when a window is about to open. With no
display the wizard stops with one line (exit code 2) pointing to the command-line mode.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_training_wizard", "open_asker"]

TRAINING_HINT = "python main.py -h lists every setting (or run_command_line.bat / run_command_line.sh)"


def open_asker(command_line_hint: str = TRAINING_HINT) -> Any:
    """The tkinter asker; raises a one-line ConfigError when no window can open here."""
    try:
        from .tk_asker import TkAsker
    except ImportError as err:  # a Python built without tkinter
        from sd_scripts.core.errors import ConfigError

        raise ConfigError(f"popup: tkinter is not available in this Python ({err}); use the command-line mode "
                          f"instead: {command_line_hint}", setting="popup") from None
    return TkAsker(command_line_hint=command_line_hint)


def run_training_wizard(defaults: Any, asker: Any = None) -> Any:
    """Ask the training questions; return the ArgStore to run, or None when the user cancelled.

    ``defaults`` is the ArgStore built from ``ArgsList.py`` and the command-line flags; each
    question starts from its value.
    """
    from .training_flow import TrainingWizard

    own = asker is None
    if own:
        asker = open_asker()
    try:
        return TrainingWizard(asker, defaults).run()
    finally:
        if own:
            asker.close()
