# Sourced by the ensure-* scripts: how root-only commands can run here.
#   PRIV       root, sudo (passwordless) or none
#   SUDO_HINT  the prefix a human should type for root-only commands
#   as_root    runs a command as root; returns 99 when it cannot

PRIV=none
if [[ $(id -u) -eq 0 ]]; then
  PRIV=root
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
  PRIV=sudo
fi

SUDO_HINT=""
[[ $PRIV == root ]] || SUDO_HINT="sudo "

as_root() {
  case $PRIV in
    root) "$@" ;;
    sudo) sudo -n "$@" ;;
    *) return 99 ;;
  esac
}
