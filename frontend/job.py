"""One queue job in its own process: ``python -m frontend.job SETTINGS.json RESULT.json``.

SETTINGS.json holds the job's fully resolved ArgStore (every key), written by the queue; it is
loaded as it is, without ArgsList defaults or a skip list. RESULT.json receives the output file.
Exit codes: 0 trained, 2 a user mistake (one line printed), 130 stopped by Ctrl+C, other: a crash.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    from sd_scripts.core.errors import EXIT_USER_ERROR, UserError, UserErrors

    from ArgsList import ArgStore
    from frontend.json_io import load_settings_file, write_json_atomic
    from frontend.training import run_training

    settings_path, result_path = (sys.argv[1:] if argv is None else argv)[:2]
    try:
        loaded = load_settings_file(settings_path, ArgStore)
        store = ArgStore().replace(**loaded.values)
        result = run_training(store)
    except UserErrors as err:
        for item in err.errors:
            print(f"error: {item}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped by Ctrl+C", file=sys.stderr)
        return 130
    write_json_atomic(result_path, {"output_path": result.output_path})
    return 0


if __name__ == "__main__":
    sys.exit(main())
