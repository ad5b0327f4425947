"""The tkinter asker: one small window per question, with real widgets.

Each window shows the question, its one-line explanation, its default and (when the last answer
was refused) the reason in red. Widgets by kind: Yes/No buttons; a list to choose from; an entry
checked as you type (numbers, text); an entry with Browse buttons (files and folders); one slider
per item (merge ratios); a checkbox per option; a scrolled summary with one button per action;
a progress bar while the dataset is scanned.
Every window has a Cancel button that ends the wizard; closing a window keeps the default (the
summary window is the exception: closing it cancels, so nothing starts by accident).

Tests drive the windows through ``TkAsker(on_open=...)``: the hook receives each
:class:`QuestionWindow` / :class:`MessageWindow` once it is shown and invokes its widgets.
"""

from __future__ import annotations

import os
import time
import tkinter as tk
from tkinter import filedialog, ttk
from typing import Any, Callable

from sd_scripts.core.errors import ConfigError

from .asker import Cancelled, Question

__all__ = ["TkAsker", "QuestionWindow", "MessageWindow", "WorkingWindow", "NoDisplay", "open_root"]

APP_TITLE = "LoRA Easy Training Scripts"
_WRAP = 560
_ERROR_FG = "#b00020"
_HELP_FG = "#555555"
_FILETYPE_NAMES = {".safetensors": "safetensors", ".ckpt": "checkpoint", ".pt": "PyTorch", ".json": "JSON",
                   ".txt": "text"}


class NoDisplay(ConfigError):
    """No window can open here (no display, or no tkinter): one line pointing to the command line."""


def open_root(command_line_hint: str) -> tk.Tk:
    """A hidden Tk root; :class:`NoDisplay` when there is no screen to show windows on."""
    try:
        root = tk.Tk()
    except tk.TclError as err:
        reason = " ".join(str(err).split()) or "no display"
        raise NoDisplay(f"popup: no display to open windows on ({reason}); use the command-line mode instead: "
                        f"{command_line_hint}", setting="popup") from None
    root.withdraw()
    root.title(APP_TITLE)
    return root


def _entry_text(question: Question) -> str:
    value = question.default
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class _Window:
    """Shared frame: title, prompt, help, default, error line, body, button row."""

    def __init__(self, root: tk.Misc, title: str):
        self.top = tk.Toplevel(root)
        self.top.title(f"{APP_TITLE} - {title}" if title else APP_TITLE)
        self.top.protocol("WM_DELETE_WINDOW", self.close)
        self.top.bind("<Escape>", lambda _event: self.close())
        self.frame = tk.Frame(self.top, padx=16, pady=12)
        self.frame.pack(fill="both", expand=True)
        self.buttons: dict[str, tk.Button] = {}
        self.outcome: str | None = None  # "answer", "closed" or "cancelled"

    def label(self, text: str, **options: Any) -> tk.Label:
        widget = tk.Label(self.frame, text=text, wraplength=_WRAP, justify="left", anchor="w", **options)
        widget.pack(fill="x", pady=(0, 4))
        return widget

    def button(self, row: tk.Frame, key: str, text: str, command: Callable[[], None], side: str = "left") -> tk.Button:
        widget = tk.Button(row, text=text, command=command, padx=10)
        widget.pack(side=side, padx=(0, 6), pady=(6, 0))
        self.buttons[key] = widget
        return widget

    def finish(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
        if self.top.winfo_exists():
            self.top.destroy()

    def close(self) -> None:
        self.finish("closed")

    def show(self) -> None:
        """Centre the window on the screen and bring it to the front."""
        self.top.update_idletasks()
        width, height = self.top.winfo_reqwidth(), self.top.winfo_reqheight()
        x = max(0, (self.top.winfo_screenwidth() - width) // 2)
        y = max(0, (self.top.winfo_screenheight() - height) // 3)
        self.top.geometry(f"+{x}+{y}")
        self.top.lift()
        self.top.focus_force()


class MessageWindow(_Window):
    """A message (dataset check, problems, saved file) with an OK button."""

    def __init__(self, root: tk.Misc, title: str, text: str, level: str = "info"):
        super().__init__(root, title)
        self.text = text
        fg = _ERROR_FG if level == "error" else None
        heading = {"error": "Problem", "warning": "Please check"}.get(level, title)
        self.label(heading, font=("TkDefaultFont", 11, "bold"))
        for line in text.splitlines():
            colour = fg or ("#8a5a00" if line.startswith("warning:") else None)
            self.label(line, **({"fg": colour} if colour else {}))
        row = tk.Frame(self.frame)
        row.pack(fill="x")
        self.button(row, "ok", "OK", lambda: self.finish("answer"))
        self.top.bind("<Return>", lambda _event: self.buttons["ok"].invoke())


class WorkingWindow(_Window):
    """Shown while something slow runs (the dataset scan): a progress bar, no buttons."""

    def __init__(self, root: tk.Misc, title: str, text: str):
        super().__init__(root, title)
        self.label(text, font=("TkDefaultFont", 11, "bold"))
        self.status = self.label("", fg=_HELP_FG)
        self.bar = ttk.Progressbar(self.frame, length=420, mode="determinate")
        self.bar.pack(fill="x", pady=(4, 0))
        self._shown_at = 0.0

    def close(self) -> None:
        pass  # it goes away by itself when the work is done

    def __enter__(self) -> "WorkingWindow":
        self.show()
        self.top.update()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish("answer")

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._shown_at < 0.05:
            return  # repaint at most 20 times a second
        self._shown_at = now
        if self.top.winfo_exists():
            self.bar.config(maximum=max(total, 1), value=done)
            self.status.config(text=f"{done} of {total}")
            self.top.update()


class QuestionWindow(_Window):
    """The window for one :class:`Question`; ``raw`` holds the accepted answer."""

    def __init__(self, root: tk.Misc, question: Question):
        super().__init__(root, question.title)
        self.question = question
        self.raw: Any = None
        self.entry: tk.Entry | None = None
        self.listbox: tk.Listbox | None = None
        self.scales: list[tk.Scale] = []
        self.check_vars: dict[Any, tk.BooleanVar] = {}
        self.checkbuttons: dict[Any, tk.Checkbutton] = {}
        self.text: tk.Text | None = None
        self.label(question.prompt, font=("TkDefaultFont", 11, "bold"))
        if question.help:
            self.label(question.help, fg=_HELP_FG)
        if question.kind != "summary":
            self.label(f"Default: {question.default_text()}  (closing this window keeps the default)", fg=_HELP_FG)
        self.error_label = self.label(question.error or "", fg=_ERROR_FG)
        self.body = tk.Frame(self.frame)
        self.body.pack(fill="both", expand=True, pady=(4, 4))
        self.row = tk.Frame(self.frame)
        self.row.pack(fill="x")
        self.default_button = "ok"
        getattr(self, f"_build_{question.kind}")()
        self.button(self.row, "cancel", "Cancel", lambda: self.finish("cancelled"), side="right")
        self.top.bind("<Return>", self._on_return)

    # ------------------------------------------------------------------ answering
    def submit(self, raw: Any) -> bool:
        """Accept ``raw`` if it passes the question's checks; otherwise show why and stay open."""
        _, reason = self.question.check_answer(raw)
        if reason:
            self.error_label.config(text=reason)
            return False
        self.raw = raw
        self.finish("answer")
        return True

    def _on_return(self, _event: Any = None) -> None:
        button = self.buttons.get(self.default_button)
        if button is not None:
            button.invoke()

    # ------------------------------------------------------------------ kinds
    def _build_yes_no(self) -> None:
        self.button(self.row, "yes", "Yes", lambda: self.submit(True))
        self.button(self.row, "no", "No", lambda: self.submit(False))
        self.default_button = "yes" if self.question.default else "no"
        self.buttons[self.default_button].focus_set()

    def _build_choice(self) -> None:
        q = self.question
        self.listbox = tk.Listbox(self.body, height=min(len(q.options), 12), exportselection=False, width=60,
                                  activestyle="dotbox")
        for option in q.options:
            self.listbox.insert("end", q.label(option))
        if len(q.options) > 12:
            bar = tk.Scrollbar(self.body, command=self.listbox.yview)
            self.listbox.config(yscrollcommand=bar.set)
            bar.pack(side="right", fill="y")
        self.listbox.pack(fill="both", expand=True)
        if q.default in q.options:
            index = q.options.index(q.default)
            self.listbox.selection_set(index)
            self.listbox.activate(index)
            self.listbox.see(index)
        self.listbox.bind("<Double-Button-1>", lambda _event: self._submit_choice())
        self.listbox.focus_set()
        self.button(self.row, "ok", "OK", self._submit_choice)

    def _submit_choice(self) -> None:
        picked = self.listbox.curselection()
        self.submit(self.question.options[picked[0]] if picked else self.question.default)

    def _build_entry(self) -> None:
        self.entry_text = tk.StringVar(master=self.top, value=_entry_text(self.question))
        self.entry = tk.Entry(self.body, width=64, textvariable=self.entry_text)
        self.entry.pack(fill="x")
        self.entry.focus_set()
        self.entry.select_range(0, "end")
        self.button(self.row, "ok", "OK", lambda: self.submit(self.entry.get()))

    def _build_number(self) -> None:
        self._build_entry()
        self.entry_text.trace_add("write", lambda *_args: self._live_check())

    def _live_check(self) -> None:
        _, reason = self.question.check_answer(self.entry.get())
        self.error_label.config(text=reason or "")
        self.entry.config(fg=_ERROR_FG if reason else "black")

    def _build_text(self) -> None:
        self._build_entry()
        if self.question.check is not None:
            self.entry_text.trace_add("write", lambda *_args: self._live_check())

    def _build_path(self) -> None:
        self._build_entry()
        kind = self.question.path_kind
        if kind in ("dir", "out_dir"):
            self.button(self.row, "browse", "Browse...", self._browse_dir)
        else:
            self.button(self.row, "browse", "Browse...", self._browse_file)
            if kind in ("model", "file_or_dir"):
                self.button(self.row, "browse_folder", "Folder...", self._browse_dir)

    def _initial_dir(self) -> str | None:
        current = self.entry.get().strip()
        if current:
            folder = current if os.path.isdir(current) else os.path.dirname(current)
            if os.path.isdir(folder):
                return folder
        return None

    def _filetypes(self) -> list[tuple[str, str]]:
        exts = self.question.filetypes
        if not exts:
            return [("All files", "*")]
        pattern = " ".join(f"*{e}" for e in exts)
        names = "/".join(_FILETYPE_NAMES.get(e, e) for e in exts)
        return [(names, pattern), ("All files", "*")]

    def _browse_file(self) -> None:
        options = dict(parent=self.top, title=self.question.prompt, filetypes=self._filetypes())
        if self._initial_dir():
            options["initialdir"] = self._initial_dir()
        if self.question.path_kind == "save_file":
            chosen = filedialog.asksaveasfilename(defaultextension=(self.question.filetypes or ("",))[0], **options)
        else:
            chosen = filedialog.askopenfilename(**options)
        self._set_entry(chosen)

    def _browse_dir(self) -> None:
        options = dict(parent=self.top, title=self.question.prompt, mustexist=self.question.path_kind == "dir")
        if self._initial_dir():
            options["initialdir"] = self._initial_dir()
        self._set_entry(filedialog.askdirectory(**options))

    def _set_entry(self, chosen: Any) -> None:
        if chosen:  # an empty answer means the dialog was cancelled: keep what was there
            self.entry.delete(0, "end")
            self.entry.insert(0, str(chosen))
            self.error_label.config(text="")

    def _build_sliders(self) -> None:
        q = self.question
        low = q.low if q.low is not None else 0.0
        high = q.high if q.high is not None else 1.0
        for option, value in zip(q.options, q.default):
            tk.Label(self.body, text=q.label(option), anchor="w").pack(fill="x")
            scale = tk.Scale(self.body, from_=low, to=high, resolution=q.step or 0.05, orient="horizontal",
                             length=480, tickinterval=1 if high - low >= 2 else 0)
            scale.set(value)
            scale.pack(fill="x", pady=(0, 6))
            self.scales.append(scale)
        self.button(self.row, "ok", "OK", lambda: self.submit([s.get() for s in self.scales]))

    def _build_checks(self) -> None:
        q = self.question
        for option in q.options:
            var = tk.BooleanVar(master=self.top, value=option in (q.default or ()))
            box = tk.Checkbutton(self.body, text=q.label(option), variable=var, anchor="w")
            box.pack(fill="x")
            self.check_vars[option] = var
            self.checkbuttons[option] = box
        self.button(self.row, "ok", "OK",
                    lambda: self.submit([o for o in q.options if self.check_vars[o].get()]))

    def _build_summary(self) -> None:
        q = self.question
        self.text = tk.Text(self.body, width=96, height=min(max(len(q.details), 6), 28), wrap="word")
        bar = tk.Scrollbar(self.body, command=self.text.yview)
        self.text.config(yscrollcommand=bar.set)
        bar.pack(side="right", fill="y")
        self.text.pack(fill="both", expand=True)
        self.text.insert("1.0", "\n".join(q.details))
        self.text.config(state="disabled")
        for option in q.options:
            self.button(self.row, option, q.label(option), lambda o=option: self.submit(o))
        self.default_button = q.default if q.default in q.options else q.options[0]


class TkAsker:
    """Asks in tkinter windows. ``on_open(window)`` is called once each window is shown (tests)."""

    def __init__(self, root: tk.Misc | None = None, *, command_line_hint: str = "python main.py -h",
                 on_open: Callable[[Any], None] | None = None):
        self.owns_root = root is None
        self.root = open_root(command_line_hint) if root is None else root
        self.on_open = on_open
        self._hook_error: BaseException | None = None

    def ask(self, question: Question) -> Any:
        window = QuestionWindow(self.root, question)
        self._wait(window)
        if window.outcome == "answer":
            return window.raw
        if window.outcome == "cancelled" or question.kind == "summary":
            raise Cancelled(question.key)
        return question.default

    def tell(self, title: str, text: str, level: str = "info") -> None:
        self._wait(MessageWindow(self.root, title, text, level))

    def working(self, title: str, text: str) -> WorkingWindow:
        return WorkingWindow(self.root, title, text)

    def _wait(self, window: _Window) -> None:
        window.show()
        if self.on_open is not None:
            window.top.after_idle(self._run_hook, window)
        if window.top.winfo_exists():
            self.root.wait_window(window.top)
        if self._hook_error is not None:
            error, self._hook_error = self._hook_error, None
            raise error

    def _run_hook(self, window: _Window) -> None:
        try:
            self.on_open(window)
        except BaseException as err:  # noqa: BLE001 - re-raised in _wait, so a failing test never hangs
            self._hook_error = err
            window.finish("cancelled")

    def close(self) -> None:
        if self.owns_root:
            try:
                self.root.destroy()
            except tk.TclError:
                pass
