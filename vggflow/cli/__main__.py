"""``python -m vggflow.cli``: the `vggflow` console script."""

from vggflow.cli import console

console()
