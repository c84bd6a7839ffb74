"""The course's measurements, one module per experiment: ``python -m bench`` lists them and
``python -m bench <experiment> [args]`` runs one. Each writes JSON that records the card, the
library versions, the commit and the command that made it (``bench/results/``)."""
import shlex


def command(experiment: str, argv: list[str]) -> str:
    """The command line that reproduces a run, as stored in its result file."""
    return "python -m bench " + shlex.join([experiment, *argv])
