"""`nanops train [yolov5 train flags]`: yolov5's own command line, protected; exit statuses
0 (finished), 1 (finished with a model that could not be saved finite), 2 (bad arguments, a
refused checkpoint), 3 (stopped: the run diverged)."""
from __future__ import annotations

import os
import pickle
import sys

from ..training import POLICIES, Diverged, UntrustedCheckpoint
from .api import POLICY_ENV, argv, protected_main
from .shims import prepare_environment, quiet_yolov5_import

OWN_FLAGS_HELP = (f"--nanops-on-divergence {{{','.join(POLICIES)}}}: what a diverging run gets (default: "
                  f"${POLICY_ENV}, else warn)")


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
        policy, args = own_flags(args)
    except ValueError as err:
        print(f"nanops train: {err}", file=sys.stderr)
        return 2
    if "-h" in args or "--help" in args:
        print(f"nanops' own option (before yolov5's, which follow):\n  {OWN_FLAGS_HELP}\n")
    with argv(["nanops train", *args]):
        opt = yolov5_train.parse_opt()  # yolov5's own parser: unknown flags get its usage and exit 2
    try:
        protection = protected_main(opt, policy)
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


def own_flags(args: list[str]) -> tuple[str, list[str]]:
    """nanops' own options, taken out before yolov5's parser sees the rest; all start with
    --nanops- so they can never clash with a yolov5 flag. --nanops-on-divergence warn|stop|rollback
    (default: $NANOPS_ON_DIVERGENCE, else warn)."""
    policy = os.environ.get(POLICY_ENV, "warn")
    rest, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--nanops-on-divergence" or arg.startswith("--nanops-on-divergence="):
            if "=" in arg:
                policy = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                policy, i = args[i + 1], i + 1
            else:
                raise ValueError("--nanops-on-divergence needs a value: warn, stop or rollback")
        elif arg.startswith("--nanops-"):
            raise ValueError(f"unknown nanops option {arg} (there is --nanops-on-divergence)")
        else:
            rest.append(arg)
        i += 1
    if policy not in POLICIES:
        raise ValueError(f"--nanops-on-divergence must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy, rest
