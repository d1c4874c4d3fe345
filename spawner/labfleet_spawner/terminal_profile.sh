# labfleet: start-up file of JupyterLab terminals (bash --init-file, interactive).
#
# A terminal should behave like a login on any machine: the system's and the
# user's profiles are read. But a login shell's /etc/profile puts a fixed
# system PATH in place, and the notebook's environment (its Python, its
# virtualenv, labfleet-batch) would vanish from the terminal. So this file
# reads what a login shell reads, and puts the notebook's PATH back in front
# right after /etc/profile; the user's own profile still comes last and wins.
__labfleet_path=$PATH
if [ -r /etc/profile ]; then . /etc/profile; fi
__labfleet_keep=$__labfleet_path
IFS=: read -r -a __labfleet_dirs <<< "$PATH"
for __labfleet_dir in "${__labfleet_dirs[@]}"; do
  case ":$__labfleet_keep:" in
    *":$__labfleet_dir:"*) ;;
    *) __labfleet_keep="$__labfleet_keep:$__labfleet_dir" ;;
  esac
done
export PATH=$__labfleet_keep
unset __labfleet_path __labfleet_keep __labfleet_dirs __labfleet_dir
if [ -r ~/.bash_profile ]; then . ~/.bash_profile
elif [ -r ~/.bash_login ]; then . ~/.bash_login
elif [ -r ~/.profile ]; then . ~/.profile
else
  # no personal profile yet: what Debian's default ~/.profile would do
  if [ -d ~/.local/bin ]; then PATH="$HOME/.local/bin:$PATH"; fi
  if [ -r ~/.bashrc ]; then . ~/.bashrc; fi
fi
