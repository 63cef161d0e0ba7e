# Sourced by the launchers: the project's environment, so that a fresh clone runs them exactly as
# the README writes them once `make setup` has made .venv, with nothing activated.
#
# VENV  environment with attent-scale installed (default: .venv of this checkout); where it lacks
#       a command, the command comes from PATH (an activated environment, a module, a container)
#
# The environment's bin/ is not put on PATH: DeepSpeed would then find another ninja than other
# jobs of the same user, and each ninja takes the other's build of an op for stale and rebuilds it.
_attent_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$_attent_root/.venv}

# project_tool NAME: the path of NAME in $VENV/bin, else of NAME on PATH, else a one-line error.
project_tool() {
    if [[ -x "$VENV/bin/$1" ]]; then
        echo "$VENV/bin/$1"
    elif command -v "$1"; then
        :
    else
        echo "$(basename "$0"): '$1' not found, neither in $VENV/bin nor on PATH; run 'make" \
             "setup' in $_attent_root, or set VENV to the environment where attent-scale is" \
             "installed" >&2
        return 2
    fi
}
