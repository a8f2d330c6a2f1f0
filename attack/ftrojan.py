"""Attack ftrojan on CIFAR-10, then the DataElixir defence; results in record/<save_folder_name>/.

python attack/ftrojan.py --yaml_path config/ftrojan/cifar10.yaml --save_folder_name ftrojan
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.dataelixir.flow import run_attack_then_defence  # noqa: E402
from utils.fileio import cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> None:
    run_attack_then_defence("ftrojan", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
