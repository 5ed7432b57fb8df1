"""`nanops train [yolov5 train flags]`: yolov5's own command line, protected; exit statuses
0 (finished), 1 (finished with a model that could not be saved finite), 2 (bad arguments, a
refused checkpoint), 3 (stopped: the run diverged)."""
from __future__ import annotations

import os
import pickle
import sys

from ..training import HEADROOM_POLICIES, POLICIES, Diverged, UntrustedCheckpoint
from .api import HEADROOM_ENV, POLICY_ENV, argv, protected_main
from .shims import prepare_environment, quiet_yolov5_import

# nanops' own flags: name -> (choices, environment variable with the default, what it sets)
OWN_FLAGS = {
    "--nanops-on-divergence": (POLICIES, POLICY_ENV, "what a diverging run gets"),
    "--nanops-on-headroom": (HEADROOM_POLICIES, HEADROOM_ENV,
                             "what a module near float16's limit under AMP gets (read each epoch)"),
}
OWN_FLAGS_HELP = "\n  ".join(f"{flag} {{{','.join(choices)}}}: {what} (default: ${env}, else warn)"
                             for flag, (choices, env, what) in OWN_FLAGS.items())


def main(args: list[str]) -> int:
    """`nanops train [yolov5 train flags]`: exit status 0 when training finished."""
    prepare_environment()
    try:
        yolov5_train = quiet_yolov5_import("yolov5.train")
    except ImportError as err:
        print(f"nanops train: needs the yolov5 package ({err}); install it with: pip install 'nanops[yolov5]'",
              file=sys.stderr)
        return 2
    try:
        (policy, headroom), args = own_flags(args)
    except ValueError as err:
        print(f"nanops train: {err}", file=sys.stderr)
        return 2
    if "-h" in args or "--help" in args:
        print(f"nanops' own options (before yolov5's, which follow):\n  {OWN_FLAGS_HELP}\n")
    with argv(["nanops train", *args]):
        opt = yolov5_train.parse_opt()  # yolov5's own parser: unknown flags get its usage and exit 2
    try:
        protection = protected_main(opt, policy, headroom)
    except UntrustedCheckpoint as err:  # one line: the file, what it names, the opt-out
        print(err, file=sys.stderr)
        return 2
    except (AssertionError, FileNotFoundError, pickle.UnpicklingError) as err:
        # yolov5 reports bad paths and arguments by assertion; its message, without our frames.
        print(f"nanops train: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"nanops train: {err}", file=sys.stderr)
        return 3
    if protection.unsaved:
        print(f"nanops train: the run ended with a model that could not be saved finite; {len(protection.unsaved)} "
              f"checkpoint write(s) were refused ({protection.unsaved[-1]}); {protection.weights_on_disk()}",
              file=sys.stderr)
        return 1
    return 0


def own_flags(args: list[str]) -> tuple[tuple[str, str], list[str]]:
    """nanops' own options, taken out before yolov5's parser sees the rest; all start with
    --nanops- so they can never clash with a yolov5 flag. Returns ((on_divergence, on_headroom),
    the other arguments); each defaults to its environment variable, else warn."""
    values = {flag: os.environ.get(env, "warn") for flag, (_, env, _) in OWN_FLAGS.items()}
    rest, i = [], 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if flag in OWN_FLAGS:
            if "=" in arg:
                values[flag] = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                values[flag], i = args[i + 1], i + 1
            else:
                raise ValueError(f"{flag} needs a value: {', '.join(OWN_FLAGS[flag][0])}")
        elif arg.startswith("--nanops-"):
            raise ValueError(f"unknown nanops option {arg} (there are {', '.join(OWN_FLAGS)})")
        else:
            rest.append(arg)
        i += 1
    for flag, value in values.items():
        if value not in OWN_FLAGS[flag][0]:
            raise ValueError(f"{flag} must be one of {', '.join(OWN_FLAGS[flag][0])}, got {value!r}")
    return (values["--nanops-on-divergence"], values["--nanops-on-headroom"]), rest
