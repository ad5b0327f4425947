"""The training wizard's questions, in order, as plain Python over an :class:`~popups.asker.Asker`.

Start (new setup, load a JSON file, or run a queue folder), then the paths (re-asked after a JSON
load only if the user wants), saving a JSON, and the settings in the order a LoRA is usually
planned. Which step asks a setting is part of its declaration (``wizard=`` in
``sd_scripts/core/settings.py``, the steps in ``WIZARD_STEPS``): a question about a setting takes its
window title, help line, bounds and choices from there and its default from the store, and a question
of the wizard's own (the model type, the GPU memory recipe, the network type ...) names the settings its
answer decides, each declared for that step. The answers go into an ``ArgStore``, the same object the
command line builds, so the same engine runs and the same JSON is saved. The last window lists the
choices by step, with the estimated number of steps, and offers start, save as JSON, or back.

Right after the base model comes the model type (SD 1.x, SD 2.x, SDXL, FLUX.1), preselected from the model's
header when that can be read without torch; SDXL sizes the resolution and bucket defaults (1024 px,
buckets 512-2048) before the images are checked, skips clip skip, offers ``no_half_vae`` under fp16.
FLUX.1 asks for the CLIP-L, T5-XXL and autoencoder files the model file lacks, starts from kohya's FLUX.1
settings (``FLUX_WIZARD_DEFAULTS``: dim 16, 1e-4, 1024 px, cached latents and text-encoder outputs) for the
settings still at their defaults, and asks the FLUX.1 training choices instead of clip skip.
The text-encoder output cache is offered only for UNet-only training with captions that stay the same.
Then "How much memory does your GPU have?" sets the memory settings to a recipe for that family
(``gpu_memory.MEMORY_RECIPES``; preselected from the detected card, else "keep my settings"); the later
questions start from the recipe's values, and a changed answer undoes the previous recipe first.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from ArgsList import ArgStore
from frontend.fields import format_value
from frontend.model_family import cheap_family, model_family_of, resize_for_family
from sd_scripts.core.settings import (STEP_CACHING, STEP_CAPTIONS, STEP_GPU_MEMORY, STEP_LEARNING_RATES, STEP_LENGTH,
                                      STEP_LOAD_JSON, STEP_LOSS, STEP_MODEL, STEP_NETWORK, STEP_OPTIMIZER, STEP_PATHS,
                                      STEP_QUEUE, STEP_RESOLUTION, STEP_SAMPLES, STEP_SAVE_JSON, STEP_SAVING,
                                      STEP_SCHEDULE, STEP_VALIDATION, WIZARD_STEPS, asked_in_wizard, declared)

from . import gpu_memory
from .asker import Asker, Cancelled, Question, ask
from .dataset_check import (DatasetReport, check_dataset, estimate_steps, has_transparent_images, make_report_picture,
                            open_with_viewer, scan_key)

__all__ = ["TrainingWizard", "NETWORK_TYPES", "LR_FREE_OPTIMIZERS", "MODEL_TYPES"]

INFOS = {info.name: info for info in ArgStore.settings()}


def _names(step: str) -> tuple[str, ...]:
    """The settings declared for a step of the wizard (``wizard=`` in sd_scripts/core/settings.py)."""
    return tuple(s.name for s in asked_in_wizard(step))


NETWORK_TYPES = ("LoRA", "LoCon", "LoHa", "LoKr", "IA3")
_LYCORIS_ALGOS = {"LoHa": "loha", "LoKr": "lokr", "IA3": "ia3"}
_NETWORK_LABELS = {
    "LoRA": "LoRA: the standard network, loads everywhere",
    "LoCon": "LoCon: LoRA plus the 3x3 convolutions (kohya LoCon, loads everywhere)",
    "LoHa": "LoHa (LyCORIS): Hadamard product, more capacity per rank",
    "LoKr": "LoKr (LyCORIS): Kronecker product, very small files",
    "IA3": "IA3 (LyCORIS): scales activations only, tiny files, needs a high learning rate",
}
# network_args keys this wizard manages (the rest of a loaded file's network_args is kept)
_MANAGED_NETWORK_ARGS = {"algo", "conv_dim", "conv_alpha", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp",
                         "factor"}
MODEL_TYPES = ("sd1", "sd2", "sdxl", "flux")
_MODEL_LABELS = {
    "sd1": "Stable Diffusion 1.x (SD 1.5 and the models based on it)",
    "sd2": "Stable Diffusion 2.x (512 or 768-v)",
    "sdxl": "SDXL (SDXL base, Pony, Illustrious, NoobAI ...)",
    "flux": "FLUX.1 (dev or schnell, and the models based on them)",
}
# what the model type answer sets (the CLIP token length: FLUX.1's neutral one, FLUX_WIZARD_DEFAULTS)
_MODEL_TYPE_DECIDES = ("sdxl", "v2", "v_parameterization", "max_clip_token_length")
# FLUX.1's starting point (kohya's FLUX.1 guide: dim 16, 1e-4, 1024 px, latents and text-encoder outputs cached,
# AdamW8bit on CUDA, and its recommended shift sampling with raw predictions at guidance 1), for settings the user
# has not changed from ArgsList.py; the clip skip and CLIP token length FLUX.1 does not use get neutral values
FLUX_WIZARD_DEFAULTS = {"net_dim": 16, "alpha": 16, "learning_rate": 1e-4, "cache_latents": True, "unet_only": True,
                        "cache_text_encoder_outputs": True, "optimizer_type": "AdamW8bit",
                        "timestep_sampling": "shift", "discrete_flow_shift": 3.1582, "model_prediction_type": "raw",
                        "guidance_scale": 1.0, "clip_skip": 1, "max_clip_token_length": 75}
_FLUX_PARTS = {"clip_l": "CLIP-L text encoder (clip_l.safetensors)",
               "t5xxl": "T5-XXL text encoder (t5xxl_fp16.safetensors or an fp8 one)",
               "ae": "autoencoder (ae.safetensors)"}
LR_FREE_OPTIMIZERS = {"DAdaptation", "DAdaptAdam", "DAdaptLion", "DAdaptAdaGrad", "DAdaptSGD", "DAdaptAdan", "Prodigy"}
_DECOUPLE_OPTIMIZERS = {"DAdaptation", "DAdaptAdam"}
_LR_FREE_HINT = "learning-rate-free optimizer: about 1.0, one rate for the whole network"
IA3_LEARNING_RATE = 5e-3

SUMMARY_ACTIONS = ("start", "save", "back")
# settings whose scan errors mean "choose another image folder"
_FOLDER_SETTINGS = {"train_data_dir", "reg_data_dir", "img_folder", "reg_img_folder"}
_SUMMARY_LABELS = {"start": "Start training", "save": "Save as JSON", "back": "Back"}
OTHER_SETTINGS = "Other settings (not asked here)"  # the summary's heading for the rest of the user's own values


def _bounds(decl: Any) -> dict[str, Any]:
    """The wizard's bounds for a number: what both the front end and the engine accept (the declared ranges); an
    open upper end is left to :func:`_range_check`."""
    ranges = [r for r in (decl.range, decl.engine_range if decl.in_engine else None) if r is not None]
    lows = [(r.low, r.low_open) for r in ranges if r.low is not None]
    highs = [r.high for r in ranges if r.high is not None and not r.high_open]
    bounds: dict[str, Any] = {}
    if lows:
        low = max(value for value, _ in lows)
        bounds.update(low=low, low_open=any(is_open for value, is_open in lows if value == low))
    if highs:
        bounds["high"] = min(highs)
    return bounds


def _range_check(decl: Any) -> Callable[[Any], str | None]:
    """The declared ranges as a question's check, in the command line's words: what the bounds cannot say (an open
    upper end, a share "from 0 to below 1")."""
    def check(value: Any) -> str | None:
        if value is None:
            return None
        return decl.front_problem(value) or (decl.engine_problem(value) if decl.in_engine else None)

    return check


def _both(first: Callable[[Any], str | None], second: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda value: first(value) or second(value)


def is_lr_free(optimizer: str) -> bool:
    return optimizer in LR_FREE_OPTIMIZERS


def network_type_of(store: Any) -> str:
    """The network type a store describes (for the default of the network question)."""
    args = store.network_args or {}
    if store.lyco:
        algo = str(args.get("algo", "lora")).lower()
        for name, value in _LYCORIS_ALGOS.items():
            if value == algo:
                return name
        return "LoCon"
    return "LoCon" if "conv_dim" in args else "LoRA"


def _use_tucker(args: dict) -> bool:
    if "use_tucker" in args:
        return str(args["use_tucker"]).lower() not in ("false", "0", "no", "")
    if "disable_conv_cp" in args:  # the 2023 name, inverted
        return str(args["disable_conv_cp"]).lower() in ("false", "0", "no")
    for old in ("use_cp", "use_conv_cp"):
        if old in args:
            return str(args[old]).lower() not in ("false", "0", "no", "")
    return False


def _bad_name(value: str) -> str | None:
    bad = sorted(set('/\\:*?"<>|') & set(value))
    return f"a file name cannot contain {' '.join(bad)}" if bad else None


def _has_json_files(folder: str) -> str | None:
    if not any(n.lower().endswith(".json") and os.path.isfile(os.path.join(folder, n)) for n in os.listdir(folder)):
        return f"no .json files in {folder}; choose the folder that holds the saved settings files"
    return None


class TrainingWizard:
    """One run of the wizard: ``TrainingWizard(asker, defaults).run()`` -> ArgStore, or None if cancelled.

    ``scan(store, progress)`` checks the dataset (replaceable in tests); ``save_json`` saves a JSON file the way the
    command line does and returns its path; ``make_report(store, progress)`` draws the dataset report offered after
    the image folder (``(picture, summary lines)``) and ``show_picture(path)`` opens it.
    """

    def __init__(self, asker: Asker, defaults: Any, *,
                 scan: Callable[[Any, Callable[[int, int], None]], DatasetReport] = check_dataset,
                 save_json: Callable[[Any, str, str | None], str] | None = None,
                 make_report: Callable[[Any, Callable[[int, int], None]], tuple[str, list[str]]] = make_report_picture,
                 show_picture: Callable[[str], None] = open_with_viewer):
        self.asker = asker
        self.defaults = defaults
        self.store = defaults
        self.scan = scan
        self.save_json = save_json or _save_settings_json
        self.make_report = make_report
        self.show_picture = show_picture
        self.step = "Start"  # the step asking now: a WIZARD_STEPS entry, or Start / Summary
        self.report: DatasetReport | None = None
        self._report_key: tuple | None = None
        self.notes: list[str] = []
        self._sized_for: str | None = None  # the model family whose sizes the resolution settings hold
        self._kind: str | None = None  # the model type answered
        self._gpu: tuple[str, float] | None | bool = False  # probe_gpu()'s answer; False: not probed yet
        self._memory_answer: tuple[str, str] | None = None  # (recipe family, answer) of the GPU memory question
        self._memory_applied: dict[str, tuple[Any, Any]] = {}  # setting -> (value before the recipe, recipe's value)
        self._memory_skipped: list[str] = []

    # ----------------------------------------------------------------------------- plumbing
    def question(self, name: str, prompt: str, also: tuple[str, ...] = (), **extra: Any) -> Question:
        """A question about the ArgStore setting ``name``, asked at the step its declaration names: the declared help,
        bounds and choices, its current value as default. ``also``: the settings its answer decides besides."""
        info = INFOS[name]
        settings = (name, *also)
        self._check_step(settings)
        default = getattr(self.store, name)
        values: dict[str, Any] = dict(key=name, prompt=prompt, title=self.step, help=info.help, default=default,
                                      optional=info.optional, settings=settings)
        if info.kind == "bool":
            values.update(kind="yes_no", optional=False)
        elif info.choices:
            extra_choice = (default,) if info.open_choices and default not in info.choices else ()  # a custom class
            values.update(kind="choice", options=tuple(info.choices) + extra_choice)
        elif info.kind in ("int", "float"):
            values.update(kind="number", integer=info.kind == "int", check=_range_check(info.declaration),
                          **_bounds(info.declaration))
        elif info.is_path:
            values.update(kind="path", path_kind=info.path)
        else:
            values.update(kind="text")
        if values.get("check") and extra.get("check"):  # the flow's own rule comes on top of the declared range
            extra["check"] = _both(values["check"], extra["check"])
        values.update(extra)
        return Question(**values)

    def ask_setting(self, name: str, prompt: str, also: tuple[str, ...] = (), **extra: Any) -> Any:
        value = ask(self.asker, self.question(name, prompt, also, **extra))
        self.set(**{name: value})
        return value

    def ask_plain(self, key: str, kind: str, prompt: str, default: Any, settings: tuple[str, ...] = (),
                  **extra: Any) -> Any:
        """A question of the wizard's own (``key`` is no setting); ``settings``: those its answer decides (declared
        for this step), the first one's help line unless ``help`` is given."""
        self._check_step(settings)
        if settings:
            extra.setdefault("help", INFOS[settings[0]].help)
        return ask(self.asker, Question(key=key, kind=kind, prompt=prompt, title=self.step, default=default,
                                        settings=tuple(settings), **extra))

    def _check_step(self, names: tuple[str, ...]) -> None:
        """A setting is asked at the step its declaration names (a mismatch is a bug of the wizard or the table)."""
        for name in names:
            if declared(name).wizard != self.step:
                raise LookupError(f"the wizard asks {name} at its step {self.step!r}, but sd_scripts/core/settings.py "
                                  f"declares wizard={declared(name).wizard!r}")

    def set(self, **changes: Any) -> None:
        self.store = dataclasses.replace(self.store, **changes)

    def dataset(self) -> DatasetReport:
        """The dataset report, scanned again only when the folders or the caption extension changed."""
        key = scan_key(self.store)
        if self.report is None or key != self._report_key:
            self.report, self._report_key = None, None
            with self.asker.working("Dataset", "Checking the images and captions...") as working:
                self.report = self.scan(self.store, working.update)
            self._report_key = key
        return self.report

    # ----------------------------------------------------------------------------- the run
    def run(self) -> Any:
        try:
            return self._run()
        except Cancelled:
            return None

    def _run(self) -> Any:
        start = self.ask_plain(
            "start", "choice", "What would you like to do?", "queue" if self.store.multi_run_folder else "new",
            options=("new", "load_json", "queue"),
            labels={"new": "Set up a new training", "load_json": "Load a saved JSON file",
                    "queue": "Run a queue: every JSON file in a folder"},
            help="a JSON file holds every setting; a queue folder trains each of its JSON files in turn")
        if start == "queue":
            self.step = STEP_QUEUE
            folder = self.ask_setting("multi_run_folder", "Choose the folder of JSON files to train one after another",
                                      optional=False, check=_has_json_files)
            return self.store.replace(multi_run_folder=folder)
        self.set(multi_run_folder=None)  # a queue folder given on the command line is not run after all
        if start == "load_json":
            self._load_json()
            self.step = STEP_PATHS
            if self.ask_plain("reask_paths", "yes_no", "Choose a new base model, image folder, output folder and name?",
                              False, help="the rest of the settings stay as the JSON file has them"):
                self._paths(tell_sizes=True)
            self._save_json_questions()
        else:
            self._save_json_questions()
            self._paths()
            self._settings()
        return self._summary()

    def _load_json(self) -> None:
        from frontend.resolve import resolve_settings
        from sd_scripts.core.errors import UserError, UserErrors

        self.step = STEP_LOAD_JSON
        question = self.question("load_json_path", "Choose the JSON file to load", optional=False,
                                 filetypes=(".json",))
        while True:
            path = ask(self.asker, question)
            try:
                resolved = resolve_settings({"load_json_path": path}, self.store)
            except UserError as err:
                errors = err.errors if isinstance(err, UserErrors) else [err]
                reason = str(errors[0]) + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                question = dataclasses.replace(question, error=reason)
                continue
            self.store = resolved.store
            self.notes = list(resolved.notes) + list(resolved.warnings)
            return

    def _save_json_questions(self) -> None:
        self.step = STEP_SAVE_JSON
        wanted = self.ask_plain("save_json", "yes_no", "Save these settings as a JSON file too?",
                                bool(self.store.save_json_folder), settings=_names(STEP_SAVE_JSON),
                                help="a JSON file can be loaded again, or put in a queue folder")
        if not wanted:
            self.set(save_json_folder=None, save_json_name=None, save_json_only=False)
            return
        default_folder = self.store.save_json_folder or self.store.output_folder
        self.ask_setting("save_json_folder", "Folder to save the JSON file in", optional=False, default=default_folder)
        self.ask_setting("save_json_name", "A name for the JSON file (empty: only the date and time)",
                         none_label="date and time only", check=_bad_name)
        self.ask_setting("save_json_only", "Only save the JSON, without training now (to prepare a queue)?")

    # ----------------------------------------------------------------------------- paths
    def _paths(self, tell_sizes: bool = False) -> None:
        self.step = STEP_PATHS
        self.ask_setting("base_model", "Choose the base model to train on", optional=False,
                         filetypes=(".safetensors", ".ckpt"))
        # the model type sizes the resolution, which the dataset check below measures the images against
        self.step = STEP_MODEL
        kind = self._model_type(tell_sizes=tell_sizes)
        self.step = STEP_GPU_MEMORY
        self._gpu_memory(kind, tell=tell_sizes)
        self.step = STEP_PATHS
        self._image_folder()
        if self.ask_plain("use_reg", "yes_no", "Use regularization images?", self.store.reg_img_folder is not None,
                          settings=("reg_img_folder",)):
            self.ask_setting("reg_img_folder", "Choose the regularization image folder", optional=False)
        else:
            self.set(reg_img_folder=None)
        self.ask_setting("output_folder", "Choose the folder the LoRA files are saved in", optional=False)
        self.ask_setting("change_output_name", "Name of the LoRA file (without extension)", none_label="last",
                         check=_bad_name)

    def _image_folder(self) -> None:
        """Ask for the image folder and check its layout at once; a folder that cannot train is re-asked."""
        from sd_scripts.core.errors import UserError

        question = self.question("img_folder", "Choose the image folder (the one holding the <repeats>_<name> folders)",
                                 optional=False)
        while True:
            self.set(img_folder=ask(self.asker, question))
            try:
                self.dataset()
            except UserError as err:
                if getattr(err, "setting", None) in _FOLDER_SETTINGS:
                    question = dataclasses.replace(question, error=str(err))
                    continue
                # a setting asked later (resolution, caching...) stops the scan: say so and go on
                self.asker.tell("Dataset", f"The images could not be counted yet: {err}", "warning")
                return
            self._tell_dataset()
            self._offer_report()
            return

    def _offer_report(self) -> None:
        """Offer the dataset report (``scripts/dataset_report.py``'s) for the folder just chosen, drawn with the
        settings as they are now; a problem it finds is told, and the wizard goes on either way."""
        from sd_scripts.core.errors import UserError

        if not self.ask_plain("dataset_report", "yes_no", "Look at a dataset report now?", False,
                              help="a picture of the buckets and a thumbnail of every image with its problems marked "
                                   "(no caption, too small, near-duplicates, captions too long), and a summary; "
                                   "with the resolution and buckets as they are set now"):
            return
        try:
            with self.asker.working("Dataset report", "Checking, hashing and drawing the images...") as working:
                picture, lines = self.make_report(self.store, working.update)
        except UserError as err:
            self.asker.tell("Dataset report", f"No report: {err}", "warning")
            return
        self.asker.tell("Dataset report", "\n".join(lines + ["", f"The picture: {picture}"]), "info")
        self.show_picture(picture)

    def _tell_dataset(self) -> None:
        _, per_epoch, _ = estimate_steps(self.store, self.report)
        lines = self.report.lines() + [f"{per_epoch} steps per epoch at batch size {self.store.batch_size}"]
        level = "warning" if self.report.warnings else "info"
        self.asker.tell("Dataset", "\n".join(lines + [f"warning: {w}" for w in self.report.warnings]), level)

    # ----------------------------------------------------------------------------- settings
    def _settings(self) -> None:
        self._model()
        self._optimizer()
        self._network()
        self._learning_rates()
        self._schedule()
        self._resolution_and_length()
        self._saving()
        self._captions()
        self._precision_and_caching()
        self._samples()
        self._validation()

    def _model(self) -> None:
        self.step = STEP_MODEL
        if self._kind == "flux":
            self._flux_settings()
            return
        if not self.store.sdxl:  # SDXL always uses the penultimate layers of both text encoders
            self.ask_setting("clip_skip", "Clip skip: 2 for anime-style models, 1 for realistic ones")

    def _model_type(self, tell_sizes: bool = False) -> str:
        """Ask SD 1.x / SD 2.x / SDXL (preselecting what the model file says) and size the resolution for it.

        ``tell_sizes``: the resolution questions are not asked (a loaded JSON file), so a note says what changed."""
        detected = cheap_family(self.store.base_model)  # a .safetensors header or diffusers configs; never torch
        chosen = "sdxl" if self.store.sdxl else "sd2" if self.store.v2 else "sd1"
        if detected in MODEL_TYPES:
            hint = f"the model file says {_MODEL_LABELS[detected].split(' (')[0]}"
        else:
            hint = "could not be told from the file without loading it"
        kind = self.ask_plain("model_type", "choice", "Which kind of model is the base model?",
                              detected if detected in MODEL_TYPES else chosen, options=MODEL_TYPES,
                              labels=_MODEL_LABELS, settings=_MODEL_TYPE_DECIDES,
                              help=f"{hint}; SDXL-based models (Pony, Illustrious, NoobAI) are SDXL. "
                                   "SDXL trains at 1024 px with two text encoders")
        if kind == "sd2":
            self.set(v2=True, sdxl=False)
            self.ask_setting("v_parameterization", "Is it a 768-v model (v-prediction, e.g. SD 2.x 768)?")
        elif kind == "flux":
            self.set(v2=False, sdxl=False, v_parameterization=False)
            self._flux_parts()
        else:
            # v_parameterization false: told from the model files (an SDXL v-pred model says so in its metadata)
            self.set(v2=False, sdxl=kind == "sdxl", v_parameterization=False)
        # resolution and buckets still at their defaults follow the model: SDXL 1024 px, buckets 512-2048
        if self._sized_for is None:  # sizes the command line gave an SDXL model count as defaults too
            self._sized_for = model_family_of(self.defaults)[0]
        sizes = resize_for_family(self.store, kind, previous=self._sized_for)
        self._sized_for = kind
        self._kind = kind
        if kind == "flux":
            sizes.update(self._flux_defaults())
        if sizes:
            if tell_sizes:
                shown = ", ".join(f"{name} {getattr(self.store, name)} -> {value}" for name, value in sizes.items())
                self.notes.append(f"sized for {_MODEL_LABELS[kind].split(' (')[0]}: {shown}")
            self.set(**sizes)
        return kind

    def _flux_parts(self) -> None:
        """FLUX.1's text encoders and autoencoder: asked for when the model file does not hold them (a BFL
        transformer-only file); a model that holds them may still take other files (empty: its own)."""
        from sd_scripts.core.config import TrainConfig
        from sd_scripts.core.errors import UserError
        from sd_scripts.models.loading import detect_family

        inside: dict = {}
        path = self.store.base_model
        if path and (os.path.isdir(path) or str(path).lower().endswith((".safetensors", ".sft"))):
            probe = TrainConfig(pretrained_model_name_or_path=path, model_family="flux", sdxl=None, v2=None,
                                v_parameterization=None, flux_variant=None)
            try:
                _, inside = detect_family(probe)
            except (UserError, OSError, ValueError, KeyError, TypeError):
                inside = {}
        for part, label in _FLUX_PARTS.items():
            lacks = inside.get(f"has_{part}") is False  # unknown (an unreadable file): preflight tells later
            prompt = (f"Choose the {label}" if lacks else
                      f"Choose the {label}, or leave it empty to use the model file's own")
            self.ask_setting(part, prompt, optional=not lacks, filetypes=(".safetensors", ".sft"),
                             none_label="the model's own")

    def _flux_defaults(self) -> dict[str, Any]:
        """FLUX_WIZARD_DEFAULTS for the settings still at ArgsList.py's values."""
        shipped = ArgStore()
        return {name: value for name, value in FLUX_WIZARD_DEFAULTS.items()
                if getattr(self.store, name) == getattr(shipped, name) != value}

    def _flux_settings(self) -> None:
        """kohya's FLUX.1 training choices (the wizard starts from kohya's recommended ones)."""
        self.ask_setting("guidance_scale", "Guidance scale given to FLUX.1 dev while training (kohya recommends 1.0; "
                         "schnell ignores it)")
        self.ask_setting("timestep_sampling", "How noise levels are drawn (kohya recommends shift)")
        if self.store.timestep_sampling in ("sigma", "shift"):
            self.ask_setting("discrete_flow_shift", "Shift of the noise schedule (kohya recommends 3.1582)")
        self.ask_setting("model_prediction_type", "How the model's prediction is used (kohya recommends raw)")
        self.ask_setting("apply_t5_attn_mask", "Hide T5 padding tokens from the attention (apply_t5_attn_mask)?")

    def _gpu_memory(self, model_type: str, tell: bool = False) -> None:
        """Ask the GPU's memory and set the memory settings to that card's recipe for the model family.

        The same answer again changes nothing (the later answers are the user's); another answer first puts back what
        the previous recipe set and the user did not change since. ``tell``: the later questions are not asked (a
        loaded JSON file), so a note lists the changes."""
        family = gpu_memory.recipe_family(model_type)
        options = (gpu_memory.KEEP,) + tuple(gpu_memory.MEMORY_RECIPES[family])
        if self._gpu is False:
            self._gpu = gpu_memory.probe_gpu()
        if self._gpu:
            name, gib = self._gpu
            found = f"found {name} with {gib:.1f} GB"
        else:
            found = "no CUDA GPU found here"
        kind_name = _MODEL_LABELS[model_type].split(" (")[0]
        # the recipe also presets settings of later steps (batch size, precision, caching): those are asked there
        own = tuple(name for name in _names(STEP_GPU_MEMORY) if name in gpu_memory.managed_settings(family))
        answer = self.ask_plain(
            "gpu_memory", "choice", f"How much memory does your GPU have? (sets the memory settings for {kind_name})",
            self._memory_default(family), options=options, labels=gpu_memory.MEMORY_LABELS[family], settings=own,
            help=f"{found}; the recipe sets batch size, precision, caching and gradient checkpointing to values known "
                 "to fit, and only settings still at their defaults. bf16 needs an RTX 30xx or newer")
        if (family, answer) == self._memory_answer:
            return
        self._undo_memory_recipe()
        self._memory_answer = (family, answer)
        changes, self._memory_skipped = gpu_memory.plan_recipe(self.store, family, answer)
        self._memory_applied = {name: (getattr(self.store, name), value) for name, value in changes.items()}
        if tell and changes:
            shown = ", ".join(f"{name} {format_value(value)}" for name, value in changes.items())
            self.notes.append(f"GPU memory {answer}: {shown}")
        self.set(**changes)

    def _memory_default(self, family: str) -> str:
        """The earlier answer for this family; else keep for a loaded JSON file or memory settings of the user's own;
        else the detected card's recipe; else keep."""
        if self._memory_answer is not None and self._memory_answer[0] == family:
            return self._memory_answer[1]
        # the values as they were before the last recipe (another model type's): its own values are no user's
        own = {name: getattr(self.store, name) for name in gpu_memory.managed_settings(family)}
        own.update({name: before for name, (before, after) in self._memory_applied.items()
                    if name in own and own[name] == after})
        if self.store.load_json_path or any(value != INFOS[name].default for name, value in own.items()):
            return gpu_memory.KEEP
        if self._gpu:
            return gpu_memory.suggested_answer(family, self._gpu[1])
        return gpu_memory.KEEP

    def _undo_memory_recipe(self) -> None:
        """Put back the values the last recipe replaced, where they still hold the recipe's value."""
        undo = {name: before for name, (before, after) in self._memory_applied.items()
                if getattr(self.store, name) == after}
        self.set(**undo)
        self._memory_applied = {}

    def _optimizer(self) -> None:
        self.step = STEP_OPTIMIZER
        optimizer = self.ask_setting("optimizer_type", "Which optimizer?", also=("optimizer_args",))
        args = dict(self.store.optimizer_args or {})
        if optimizer in _DECOUPLE_OPTIMIZERS:
            args.setdefault("decouple", "True")  # AdamW-style weight decay, as the 2023 tool set it
        elif not is_lr_free(optimizer):
            args.pop("decouple", None)  # only D-Adaptation and Prodigy take it
        self.set(optimizer_args=args or None)
        lr = self.store.learning_rate
        if is_lr_free(optimizer) and lr < 0.1:
            self.set(learning_rate=1.0)
        elif not is_lr_free(optimizer) and lr >= 0.1:
            self.set(learning_rate=INFOS["learning_rate"].default)

    def _network(self) -> None:
        self.step = STEP_NETWORK
        kind = self.ask_plain("network_type", "choice", "Which kind of network?", network_type_of(self.store),
                              options=NETWORK_TYPES, labels=_NETWORK_LABELS, settings=("lyco", "network_args"))
        old_args = dict(self.store.network_args or {})
        args = {k: v for k, v in old_args.items() if k not in _MANAGED_NETWORK_ARGS}
        if kind != "IA3":
            dim = self.ask_setting("net_dim", "Network dim (rank)")
            self.ask_setting("alpha", "Network alpha (often half the dim, or 1)",
                             default=min(self.store.alpha, dim))
        if kind in ("LoCon", "LoHa", "LoKr"):
            conv_dim = self.ask_plain(
                "conv_dim", "number", "Dim (rank) of the 3x3 convolution layers", int(_arg_number(
                    old_args, "conv_dim", min(self.store.net_dim, 32))), integer=True, low=1,
                settings=("network_args",),
                help="the convolutions add texture and detail; 4 to 32 is common, keep it at most the dim")
            conv_alpha = self.ask_plain(
                "conv_alpha", "number", "Alpha of the 3x3 convolution layers",
                _arg_number(old_args, "conv_alpha", min(self.store.alpha, conv_dim)), low=0, low_open=True,
                settings=("network_args",),
                help="the convolution layers are scaled by conv_alpha / conv_dim")
            args.update(conv_dim=str(conv_dim), conv_alpha=format_value(float(conv_alpha)))
        if kind == "IA3":
            args.setdefault("preset", "ia3")  # the modules LyCORIS recommends for IA3
        elif args.get("preset") == "ia3":
            args.pop("preset")
        if kind in _LYCORIS_ALGOS:
            args = {"algo": _LYCORIS_ALGOS[kind], **args}
            if kind in ("LoHa", "LoKr") and self.ask_plain(
                    "use_tucker", "yes_no", "Use Tucker (CP) decomposition for the convolutions?", _use_tucker(old_args),
                    settings=("network_args",), help="smaller files for the 3x3 convolutions; sometimes less accurate"):
                args["use_tucker"] = "True"
            if kind == "LoKr":
                factor = self.ask_plain("factor", "number", "LoKr factor (-1: chosen automatically)",
                                        int(_arg_number(old_args, "factor", -1)), integer=True, low=-1,
                                        settings=("network_args",),
                                        check=lambda v: "use -1 or a factor of 1 or more" if v == 0 else None,
                                        help="how the Kronecker product splits each weight; -1 lets LyCORIS choose")
                if factor != -1:
                    args["factor"] = str(factor)
        self.set(lyco=kind in _LYCORIS_ALGOS, network_args=args or None)
        if not is_lr_free(self.store.optimizer_type):
            # IA3 only scales activations: it needs a far higher rate (LyCORIS suggests about 5e-3)
            lr, plain = self.store.learning_rate, INFOS["learning_rate"].default
            if kind == "IA3" and lr == plain:
                self.set(learning_rate=IA3_LEARNING_RATE)
            elif kind != "IA3" and lr == IA3_LEARNING_RATE:
                self.set(learning_rate=plain)
        parts = self.ask_plain("train_parts", "choice", "Which parts of the model should the network train?",
                               "unet" if self.store.unet_only else "text" if self.store.text_only else "both",
                               options=("both", "unet", "text"),
                               labels={"both": "UNet and text encoder", "unet": "UNet only", "text": "Text encoder only"},
                               settings=("unet_only", "text_only"), help="most LoRAs train both")
        self.set(unet_only=parts == "unet", text_only=parts == "text")

    def _learning_rates(self) -> None:
        self.step = STEP_LEARNING_RATES
        if is_lr_free(self.store.optimizer_type):
            self.ask_setting("learning_rate", f"Learning rate ({_LR_FREE_HINT})", low=0, low_open=True)
            self.set(unet_lr=None, text_encoder_lr=None)
            return
        self.ask_setting("learning_rate", "Learning rate", low=0, low_open=True)
        same = "same as learning_rate"
        if not self.store.text_only:
            self.ask_setting("unet_lr", "Learning rate of the UNet (empty: the learning rate)", low=0, low_open=True,
                             none_label=same)
        else:
            self.set(unet_lr=None)
        if not self.store.unet_only:
            self.ask_setting("text_encoder_lr", "Learning rate of the text encoder (empty: the learning rate)", low=0,
                             low_open=True, none_label=same)
        else:
            self.set(text_encoder_lr=None)

    def _schedule(self) -> None:
        self.step = STEP_SCHEDULE
        scheduler = self.ask_setting("scheduler", "How should the learning rate change during training?")
        if scheduler == "cosine_with_restarts":
            self.ask_setting("cosine_restarts", "Number of restarts", optional=False,
                             default=self.store.cosine_restarts or 1)
        elif scheduler == "polynomial":
            self.ask_setting("scheduler_power", "Power of the polynomial", optional=False,
                             default=self.store.scheduler_power or 1.0)
        if scheduler in ("constant", "adafactor"):
            self.set(warmup_lr_ratio=None)
        else:
            self.ask_setting("warmup_lr_ratio", "Share of the steps spent warming up (empty: no warm-up)",
                             none_label="no warm-up")

    def _resolution_and_length(self) -> None:
        self.step = STEP_RESOLUTION
        step = (self.store.bucket_reso_steps or 64) if self.store.buckets else 8
        multiple = (lambda v: None if v % step == 0 else
                    f"must be a multiple of {step}, e.g. {max(step, round(v / step) * step)}")
        prompt = "Training resolution (width)" + ("; SDXL models train at 1024" if self.store.sdxl else "")
        # the bucket range is widened to hold the resolution below (the engine refuses it otherwise)
        width = self.ask_setting("train_resolution", prompt, low=step, check=multiple,
                                 also=("min_bucket_resolution", "max_bucket_resolution"))
        self.ask_setting("height_resolution", "Training height (empty: the same as the width)", low=step,
                         check=multiple, none_label=f"same as the width ({width})")
        if self.store.height_resolution == width:
            self.set(height_resolution=None)
        if self.store.buckets:
            self.ask_setting("bucket_no_upscale", "Never upscale small images into bigger buckets?")
            sides = (width, self.store.height_resolution or width)
            self.set(min_bucket_resolution=min(self.store.min_bucket_resolution, *sides),
                     max_bucket_resolution=max(self.store.max_bucket_resolution, *sides))
        self.step = STEP_LENGTH
        self.ask_setting("batch_size", "Batch size (images per step; more needs more GPU memory)")
        per_epoch = self._steps_per_epoch()
        hint = f"{per_epoch} steps per epoch at batch size {self.store.batch_size}" if per_epoch else INFOS["max_steps"].help
        mode = self.ask_plain("length_mode", "choice", "Set the training length in epochs or in steps?",
                              "steps" if self.store.max_steps else "epochs", options=("epochs", "steps"),
                              settings=("num_epochs", "max_steps"), help=hint)
        if mode == "epochs":
            self.ask_setting("num_epochs", "Number of epochs")
            self.set(max_steps=None)
        else:
            self.ask_setting("max_steps", "Number of training steps", optional=False,
                             default=self.store.max_steps or (per_epoch or 100) * self.store.num_epochs)

    def _steps_per_epoch(self) -> int | None:
        from sd_scripts.core.errors import UserError

        try:
            return estimate_steps(self.store, self.dataset())[1]
        except (UserError, ValueError):  # shown as a problem in the summary
            return None

    def _saving(self) -> None:
        self.step = STEP_SAVING
        if self.store.max_steps:
            self.ask_setting("save_every_n_steps", "Also save a LoRA every N steps (empty: only at the end)",
                             none_label="only at the end")
            self.set(save_every_n_epochs=None)
        else:
            self.ask_setting("save_every_n_epochs", "Also save a LoRA every N epochs (empty: only at the end)",
                             none_label="only at the end")
            self.set(save_every_n_steps=None)
        self.ask_setting("save_precision", "Precision of the saved LoRA file")
        self.ask_setting("training_comment", "A comment stored in the LoRA's metadata (empty: none)", none_label="none")

    def _captions(self) -> None:
        self.step = STEP_CAPTIONS
        self.ask_setting("caption_extension", "Extension of the caption files",
                         check=lambda v: None if v.strip(".") else "give an extension such as .txt")
        if self.ask_setting("shuffle_captions", "Shuffle the tags of each caption?"):
            self.ask_setting("keep_tokens", "Keep the first N tags in place (empty: none)", none_label="none")
        self.ask_setting("flip_aug", "Flip images horizontally at random?")
        store = self.store
        if store.alpha_mask or (not store.dataset_config and has_transparent_images(store.img_folder)):
            self.ask_setting("alpha_mask", "Some images are transparent: let only their opaque parts count?")
        if self.ask_setting("tag_occurrence_txt_file", "Write a list of every tag with its count beside the LoRA?"):
            order = self.ask_plain("tag_order", "choice", "Sort the tag list", "alphabetically" if
                                   self.store.sort_tag_occurrence_alphabetically else "count",
                                   options=("count", "alphabetically"),
                                   labels={"count": "by count", "alphabetically": "alphabetically"},
                                   settings=("sort_tag_occurrence_alphabetically",))
            self.set(sort_tag_occurrence_alphabetically=order == "alphabetically")

    def _precision_and_caching(self) -> None:
        self.step = STEP_CACHING
        precision = self.ask_setting("mixed_precision", "Training precision (bf16 needs an RTX 30xx or newer; "
                                     f"without a GPU it is faster only on a CPU with bf16 instructions: {_cpu_bf16()})")
        if self.store.sdxl and precision == "fp16":
            self.ask_setting("no_half_vae", "Keep the VAE in float32 (the SDXL VAE overflows in fp16)?", default=True)
        if self.ask_setting("cache_latents", "Cache latents (faster; no random crop or colour augmentation)?",
                            also=("random_crop", "color_aug")):
            self.ask_setting("cache_latents_to_disk", "Keep the latent cache on disk between runs?")
            self.set(random_crop=False, color_aug=False)
        else:
            self.set(cache_latents_to_disk=False)
            self.ask_setting("random_crop", "Random crops instead of centre crops?")
        self._text_encoder_cache()
        self.step = STEP_LOSS
        if self._kind == "flux":  # a DDPM weighting: FLUX.1 has timestep_sampling and weighting_scheme instead
            self.set(min_snr_gamma=None)
            return
        self.ask_setting("min_snr_gamma", "Min-SNR gamma (empty: off; 5 is common)",
                         none_label="off")

    def _text_encoder_cache(self) -> None:
        """Only for UNet-only training: a trained text encoder, or captions that change, make the cache wrong."""
        if not self.store.unet_only:
            self.set(cache_text_encoder_outputs=False, cache_text_encoder_outputs_to_disk=False)
            return
        changing = gpu_memory.changing_captions(self.store)

        def fixed_captions(on: bool) -> str | None:
            if on and changing:
                return (f"the captions change during training ({', '.join(changing)}), so their encodings cannot be "
                        "cached; answer no, or go Back and turn that off")
            return None

        if self.ask_setting("cache_text_encoder_outputs",
                            "Cache the text encoder outputs (each caption encoded once; less GPU memory)?",
                            default=self.store.cache_text_encoder_outputs and not changing, check=fixed_captions):
            self.ask_setting("cache_text_encoder_outputs_to_disk", "Keep that cache on disk between runs?")
        else:
            self.set(cache_text_encoder_outputs_to_disk=False)

    def _samples(self) -> None:
        self.step = STEP_SAMPLES
        if not self.ask_plain("sample_images", "yes_no", "Make sample images while training?",
                              self.store.sample_prompts is not None, settings=_names(STEP_SAMPLES)):
            self.set(sample_prompts=None, sample_every_n_steps=None, sample_every_n_epochs=None, sample_at_first=False)
            return
        self.ask_setting("sample_prompts", "Choose the text file of prompts", optional=False, filetypes=(".txt",))
        self.ask_setting("sample_sampler", "Sampler for the sample images", optional=False,
                         default=self.store.sample_sampler or "ddim")
        when = self.ask_plain("sample_when", "choice", "Make samples every N steps or every N epochs?",
                              "steps" if self.store.sample_every_n_steps else "epochs", options=("epochs", "steps"),
                              settings=("sample_every_n_steps", "sample_every_n_epochs"), help="sampling takes a while: every few hundred steps, or every epoch or two, is common")
        if when == "steps":
            self.ask_setting("sample_every_n_steps", "Make samples every N steps", optional=False,
                             default=self.store.sample_every_n_steps or 200)
            self.set(sample_every_n_epochs=None)
        else:
            self.ask_setting("sample_every_n_epochs", "Make samples every N epochs", optional=False,
                             default=self.store.sample_every_n_epochs or 1)
            self.set(sample_every_n_steps=None)

    def _validation(self) -> None:
        self.step = STEP_VALIDATION
        self.ask_setting("validation_split", "Hold out a share of each folder's images to measure a validation loss "
                         "(0: no; 0.1 is common)")

    # ----------------------------------------------------------------------------- the end
    def summary_lines(self) -> list[str]:
        """The chosen settings under the step that asks them, the user's other settings, then the dataset and the
        estimated number of steps."""
        from sd_scripts.core.errors import UserError

        lines: list[str] = []
        for step in WIZARD_STEPS + [OTHER_SETTINGS]:
            shown = []
            if step == STEP_GPU_MEMORY and self._memory_answer is not None:
                family, answer = self._memory_answer
                shown += [f"  gpu_memory: {gpu_memory.MEMORY_LABELS[family][answer]}"]
                shown += [f"  {line}" for line in self._memory_skipped]
            names = _names(step) if step != OTHER_SETTINGS else _not_asked_but_set(self.store)
            shown += [f"  {name}: {format_value(getattr(self.store, name))}" for name in names
                      if _worth_listing(self.store, name)]
            if shown:
                lines += [step] + shown
        try:
            report = self.dataset()
            total, per_epoch, epochs = estimate_steps(self.store, report)
        except (UserError, ValueError) as err:
            lines += ["Dataset", f"  problem: {err}"]
        else:
            estimate = (f"Estimated steps: {total} ({per_epoch} per epoch x {epochs} "
                        f"epoch{'s' if epochs != 1 else ''})")
            lines = [estimate, ""] + lines + ["Dataset"] + [f"  {line}" for line in report.lines()]
        lines += [f"note: {n}" for n in self.notes]
        return lines

    def _summary(self) -> Any:
        from frontend.resolve import validate_store
        from sd_scripts.core.errors import UserError, UserErrors

        while True:
            self.step = "Summary"
            start = "Save the JSON file (no training)" if self.store.save_json_only else _SUMMARY_LABELS["start"]
            action = self.ask_plain("summary", "summary", "Check your settings", "start", options=SUMMARY_ACTIONS,
                                    labels={**_SUMMARY_LABELS, "start": start}, details=tuple(self.summary_lines()),
                                    help="closing this window cancels; Back goes through the questions again")
            if action == "back":
                self._paths()
                self._settings()
                continue
            if action == "save":
                self._save_now()
                continue
            try:
                validate_store(self.store)
            except UserError as err:
                errors = err.errors if isinstance(err, UserErrors) else [err]
                self.asker.tell("Cannot start", "\n".join(str(e) for e in errors), "error")
                continue
            return self.store

    def _save_now(self) -> None:
        from sd_scripts.core.errors import UserError

        self.step = STEP_SAVE_JSON
        folder = self.ask_plain("save_now_folder", "path", "Folder to save the JSON file in",
                                self.store.save_json_folder or self.store.output_folder, path_kind="out_dir",
                                help=INFOS["save_json_folder"].help)
        name = self.ask_plain("save_now_name", "text", "A name for the JSON file (empty: only the date and time)",
                              self.store.save_json_name, optional=True, none_label="date and time only",
                              check=_bad_name, help=INFOS["save_json_name"].help)
        try:
            path = self.save_json(self.store, folder, name)
        except (UserError, OSError) as err:
            self.asker.tell("Not saved", str(err), "error")
            return
        self.asker.tell("Saved", f"Settings saved to {path}\nLoad it again with: python main.py --load_json_path \"{path}\"")


def _save_settings_json(store: Any, folder: str, name: str | None) -> str:
    from frontend.json_io import save_settings_json

    return save_settings_json(store, folder, name)


_ONLY_WITH_SCHEDULER = {"cosine_restarts": "cosine_with_restarts", "scheduler_power": "polynomial"}


def _not_asked_but_set(store: Any) -> list[str]:
    """The settings no step asks whose value is not ``ArgsList.py``'s (the command line's, a JSON file's)."""
    return [info.name for info in INFOS.values()
            if info.declaration.wizard is None and getattr(store, info.name) != info.default]


def _worth_listing(store: Any, name: str) -> bool:
    """Set values, and a few that matter even when off; not the options of an unused scheduler."""
    if name in _ONLY_WITH_SCHEDULER and store.scheduler != _ONLY_WITH_SCHEDULER[name]:
        return False
    value = getattr(store, name)
    return not (value is None or value is False) or name in ("v2", "cache_latents", "flip_aug")


def _arg_number(args: dict, key: str, fallback: float) -> float:
    """A number from network_args (strings in files), or ``fallback`` when missing or not a number."""
    try:
        return float(args[key])
    except (KeyError, TypeError, ValueError):
        return float(fallback)


def _cpu_bf16() -> str:
    """What this machine's CPU does with bf16, for the precision question (no torch import: /proc/cpuinfo)."""
    from sd_scripts.training.speed import cpu_bf16_support

    support = cpu_bf16_support(ask_torch=False)
    return {"native": "this one has them", "emulated": "this one has not"}.get(support, "AMX or AVX512-BF16")
