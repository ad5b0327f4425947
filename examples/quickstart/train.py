"""Quick start: make the tiny example model (once), then train the bundled example with main.py.

Run from anywhere: ``python examples/quickstart/train.py``. It writes
``examples/quickstart/output/quickstart_lora.safetensors`` and sample images in
``examples/quickstart/output/sample/``. The model is a tiny random SD1-shaped model built in
code, so the LoRA shows the whole pipeline working, not a pretty picture.

``--sdxl`` does the same with a tiny SDXL-shaped model (``examples/quickstart/model_sdxl``, two text
encoders, UNet-only with cached text-encoder outputs as on a small GPU) and writes
``examples/quickstart/output_sdxl/``; ``--flux`` with a tiny FLUX.1-shaped model (``examples/quickstart/model_flux``,
a FluxPipeline folder: transformer, CLIP-L, T5, 16-channel VAE; kohya's FLUX.1 settings, samples with the
flow-matching sampler) and writes ``examples/quickstart/output_flux/``.
"""

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    family = "flux" if "--flux" in args else "sdxl" if "--sdxl" in args else "sd1"
    folder, config, output = {"sd1": ("model", "config.json", "output"),
                              "sdxl": ("model_sdxl", "config_sdxl.json", "output_sdxl"),
                              "flux": ("model_flux", "config_flux.json", "output_flux")}[family]
    model = os.path.join(HERE, folder)
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        print(f"building the tiny example model in examples/quickstart/{folder}")
        if family == "flux":
            from sd_scripts.testing.tiny_flux import save_tiny_flux_diffusers

            save_tiny_flux_diffusers(model, seed=0)
        else:
            from sd_scripts.testing.tiny_models import save_tiny_diffusers

            save_tiny_diffusers(model, family, seed=0)
    start = time.time()
    code = subprocess.call([sys.executable, os.path.join(ROOT, "main.py"), "--load_json_path",
                            os.path.join(HERE, config)])
    if code == 0:
        print(f"quick start finished in {time.time() - start:.0f} s: see examples/quickstart/{output}/")
    return code


if __name__ == "__main__":
    sys.exit(main())
