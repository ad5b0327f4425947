"""The wizard's real tkinter windows (run under Xvfb; skipped without a display).

Each test answers the windows through their widgets (button ``invoke()``, entry edits,
``event_generate``) from ``TkAsker(on_open=...)``, so a window that cannot be built, shown or
answered fails here. A guard cancels any window still open after a few seconds, so a broken
window fails the test instead of hanging it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from popups.asker import Cancelled, Question, ask

pytestmark = pytest.mark.gui
tk = pytest.importorskip("tkinter")

from popups import tk_asker  # noqa: E402
from popups.tk_asker import MessageWindow, QuestionWindow, TkAsker  # noqa: E402
from tests.helpers import make_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GUARD_MS = 8000


@pytest.fixture(scope="module")
def root():
    try:
        window = tk.Tk()
    except tk.TclError as err:
        pytest.skip(f"no display for tkinter windows ({err})")
    window.withdraw()
    yield window
    window.destroy()


def close(win):
    """What the window manager's close button does."""
    win.top.tk.call(win.top.protocol("WM_DELETE_WINDOW"))


def type_into(win, text):
    win.entry.delete(0, "end")
    win.entry.insert(0, text)


def asker_with(root, *steps, seen=None):
    """A TkAsker whose windows are answered by ``steps`` in turn (one callable per window)."""
    pending = list(steps)

    def on_open(win):
        win.top.after(GUARD_MS, lambda: win.finish("cancelled"))
        if seen is not None:
            seen.append(win)
        pending.pop(0)(win)

    return TkAsker(root, on_open=on_open)


def q(kind, **values):
    values.setdefault("key", kind)
    values.setdefault("prompt", f"A {kind} question")
    return Question(kind=kind, title="Test", **values)


# ------------------------------------------------------------------------------------------ one widget kind each
def test_yes_no_buttons_return_key_and_closing(root):
    question = q("yes_no", default=True, help="one-line help")
    shown = {}

    def read_then_no(win):
        shown["labels"] = [c.cget("text") for c in win.frame.winfo_children() if isinstance(c, tk.Label)]
        shown["title"] = win.top.title()
        win.buttons["no"].invoke()

    def press_return(win):
        win.buttons["yes"].focus_force()
        win.top.update()
        win.top.event_generate("<Return>")

    asker = asker_with(root, read_then_no, press_return, close)
    assert ask(asker, question) is False
    assert ask(asker, question) is True  # Return presses the default button
    assert ask(asker, question) is True  # closing keeps the default
    assert "A yes_no question" in shown["labels"] and "one-line help" in shown["labels"]
    assert any(t.startswith("Default: yes") for t in shown["labels"])
    assert shown["title"] == "LoRA Easy Training Scripts - Test"


def test_number_entry_checks_as_you_type_and_keeps_the_window_open(root):
    question = q("number", default=32, integer=True, low=1)
    states = []

    def answer(win):
        assert win.entry.get() == "32"
        type_into(win, "abc")
        states.append((win.error_label.cget("text"), win.entry.cget("fg")))
        type_into(win, "0")
        win.buttons["ok"].invoke()  # refused: the window stays, with the reason
        states.append((win.error_label.cget("text"), win.top.winfo_exists()))
        type_into(win, "16")
        states.append(win.error_label.cget("text"))
        win.buttons["ok"].invoke()

    assert ask(asker_with(root, answer), question) == 16
    assert states == [("expected a whole number, got 'abc'", tk_asker._ERROR_FG),
                      ("must be 1 or more, got 0", 1), ""]


def test_a_reasked_question_shows_why(root):
    shown = []

    def read_then_close(win):
        shown.append(win.error_label.cget("text"))
        close(win)

    assert ask(asker_with(root, read_then_close), q("text", default="x", error="a file name cannot contain /")) == "x"
    assert shown == ["a file name cannot contain /"]


def test_choice_list(root):
    question = q("choice", default="cosine", options=("linear", "cosine", "constant"), labels={"constant": "Constant"})

    def double_click_third(win):
        assert win.listbox.curselection() == (1,)  # the default is selected
        assert win.listbox.get(2) == "Constant"
        win.listbox.selection_clear(0, "end")
        win.listbox.selection_set(2)
        y = win.listbox.bbox(2)[1] + 2  # a double click on the third line: press, release, press
        win.listbox.event_generate("<ButtonPress-1>", x=5, y=y)
        win.listbox.event_generate("<ButtonRelease-1>", x=5, y=y)
        win.listbox.event_generate("<ButtonPress-1>", x=5, y=y)

    assert ask(asker_with(root, double_click_third), question) == "constant"
    assert ask(asker_with(root, lambda w: w.buttons["ok"].invoke()), question) == "cosine"
    assert ask(asker_with(root, close), question) == "cosine"


def test_path_entry_and_browse_buttons(root, tmp_path, monkeypatch):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    monkeypatch.setattr(tk_asker.filedialog, "askopenfilename", lambda **kw: str(model))
    monkeypatch.setattr(tk_asker.filedialog, "askdirectory", lambda **kw: "")  # the user cancelled the dialog

    def browse(win):
        win.buttons["browse"].invoke()
        win.buttons["ok"].invoke()

    question = q("path", path_kind="model", filetypes=(".safetensors", ".ckpt"))
    assert ask(asker_with(root, browse), question) == str(model)

    def wrong_then_right(win):
        type_into(win, str(tmp_path / "missing.safetensors"))
        win.buttons["ok"].invoke()
        assert win.error_label.cget("text").startswith("not found")
        win.buttons["browse_folder"].invoke()  # dialog cancelled: the entry keeps what was typed
        assert win.entry.get().endswith("missing.safetensors")
        type_into(win, "runwayml/stable-diffusion-v1-5")
        win.buttons["ok"].invoke()

    assert ask(asker_with(root, wrong_then_right), question) == "runwayml/stable-diffusion-v1-5"


def test_sliders_one_per_lora(root):
    question = q("sliders", default=[1.0, 1.0, 1.0], options=("a", "b", "c"), low=-1.0, high=4.0, step=0.05)

    def slide(win):
        assert len(win.scales) == 3 and (win.scales[0].cget("from"), win.scales[0].cget("to")) == (-1.0, 4.0)
        win.scales[0].set(0.7)
        win.scales[1].set(-0.55)
        win.scales[2].set(4)
        win.buttons["ok"].invoke()

    assert ask(asker_with(root, slide), question) == pytest.approx([0.7, -0.55, 4.0])
    assert ask(asker_with(root, close), question) == [1.0, 1.0, 1.0]


def test_checkboxes(root):
    question = q("checks", default=[512, 256], options=(832, 512, 256), labels={832: "832x832"}, low=1)

    def tick(win):
        win.checkbuttons[832].invoke()
        win.checkbuttons[256].invoke()
        win.buttons["ok"].invoke()

    def none_then_one(win):
        for option in (512, 256):
            win.checkbuttons[option].invoke()
        win.buttons["ok"].invoke()
        assert win.error_label.cget("text") == "tick at least 1" and win.top.winfo_exists()
        win.checkbuttons[832].invoke()
        win.buttons["ok"].invoke()

    assert ask(asker_with(root, tick), question) == [832, 512]
    assert ask(asker_with(root, none_then_one), question) == [832]
    assert ask(asker_with(root, close), question) == [512, 256]


def test_summary_buttons_and_closing_cancels(root):
    question = q("summary", default="start", options=("start", "save", "back"),
                 labels={"start": "Start training", "save": "Save as JSON", "back": "Back"},
                 details=("Paths", "  base_model: x", "Estimated steps: 20 (20 per epoch x 1 epoch)"))

    def back(win):
        assert "Estimated steps: 20" in win.text.get("1.0", "end")
        assert win.buttons["start"].cget("text") == "Start training"
        win.buttons["back"].invoke()

    assert ask(asker_with(root, back), question) == "back"
    with pytest.raises(Cancelled):
        ask(asker_with(root, close), question)


def test_cancel_button_ends_the_wizard(root):
    for kind, extra in [("yes_no", {}), ("number", {"default": 1}), ("choice", {"options": ("a",), "default": "a"})]:
        with pytest.raises(Cancelled):
            ask(asker_with(root, lambda w: w.buttons["cancel"].invoke()), q(kind, **extra))


def test_message_window(root):
    seen = []
    asker_with(root, lambda w: w.buttons["ok"].invoke(), seen=seen).tell("Dataset", "4 images\nwarning: small", "warning")
    assert isinstance(seen[0], MessageWindow) and not seen[0].top.winfo_exists()


def test_progress_window_while_working(root):
    asker = TkAsker(root)
    with asker.working("Dataset", "Checking the images...") as working:
        assert working.top.winfo_viewable()
        close(working)  # cannot be closed while working
        for done in range(1, 4):
            working.update(done, 3)
        assert (working.bar.cget("value"), working.status.cget("text")) == (3, "3 of 3")
    assert not working.top.winfo_exists()


# ------------------------------------------------------------------------------------------ whole flows
def test_training_wizard_in_real_windows(root, tmp_path, monkeypatch):
    import popups
    from ArgsList import ArgStore
    from popups import gpu_memory

    monkeypatch.setattr(gpu_memory, "probe_gpu", lambda: ("NVIDIA GeForce RTX Test", 12.0))

    data = make_dataset(tmp_path / "data")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    typed = {"base_model": str(model), "img_folder": str(data), "output_folder": str(tmp_path / "out"), "net_dim": "8"}
    shown = []

    def answer(win):
        win.top.after(GUARD_MS, lambda: win.finish("cancelled"))
        if isinstance(win, MessageWindow):
            shown.append(("message", win.text))
            win.buttons["ok"].invoke()
            return
        shown.append(win.question.key)
        key = win.question.key
        if key in typed:
            type_into(win, typed[key])
            win.buttons["ok"].invoke()
        elif key == "network_type":
            win.listbox.selection_clear(0, "end")
            win.listbox.selection_set(win.question.options.index("LoCon"))
            win.buttons["ok"].invoke()
        elif key == "summary":
            win.buttons["start"].invoke()
        else:
            close(win)  # the default

    store = popups.run_training_wizard(ArgStore(), asker=TkAsker(root, on_open=answer))
    assert store.base_model == str(model) and store.img_folder == str(data) and store.net_dim == 8
    assert store.network_args == {"conv_dim": "8", "conv_alpha": "8"}  # LoCon, conv defaults follow the dim
    assert "gpu_memory" in shown and store.batch_size == 2  # the detected 12 GB card's SD recipe, by default
    assert shown[0] == "start" and shown[-1] == "summary"
    assert ("message" in [s[0] for s in shown if isinstance(s, tuple)])


def test_image_resize_popup_in_real_windows(root, tmp_path, monkeypatch):
    import popups

    src = make_dataset(tmp_path / "data", folder="2_thing", count=2, size=(200, 200))
    dst = tmp_path / "small"

    def answer(win):
        win.top.after(GUARD_MS, lambda: win.finish("cancelled"))
        key = win.question.key
        if key == "src":
            type_into(win, str(src))
            win.buttons["ok"].invoke()
        elif key == "dst":
            assert win.entry.get() == str(src) + "_resized"
            type_into(win, str(dst))
            win.buttons["ok"].invoke()
        elif key == "sizes":
            for size in (512, 384, 256):  # keep only 128
                win.checkbuttons[size].invoke()
            win.buttons["ok"].invoke()
        elif key == "interpolation":
            win.listbox.selection_clear(0, "end")
            win.listbox.selection_set(1)
            win.buttons["ok"].invoke()
        elif key == "confirm":
            assert "--sizes 128 --interpolation cubic" in win.text.get("1.0", "end")
            win.buttons["start"].invoke()
        else:
            close(win)

    monkeypatch.setattr(popups, "open_asker", lambda *a, **k: TkAsker(root, on_open=answer))
    spec = importlib.util.spec_from_file_location("_tk_test_image_resize", ROOT / "scripts" / "image_resize.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--popup"]) == 0
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png")) == [
        "128/2_thing/img00.png", "128/2_thing/img01.png"]


def test_question_window_builds_for_every_kind(root):
    kinds = {"yes_no": {}, "choice": {"options": ("a", "b")}, "number": {}, "text": {},
             "path": {"path_kind": "save_file", "filetypes": (".json",)}, "sliders": {"options": ("x",), "default": [0.5]},
             "checks": {"options": (1, 2)}, "summary": {"options": ("start",)}}
    for kind, extra in kinds.items():
        window = QuestionWindow(root, q(kind, **extra))
        window.show()
        root.update()
        assert window.top.winfo_viewable(), kind
        close(window)
        assert window.outcome == "closed" and not window.top.winfo_exists()
