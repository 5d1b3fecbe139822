"""Shell completion for ``qprobes``, generated from the argparse definitions.

``eval "$(qprobes completion bash)"`` (bash; zsh after ``autoload -U
bashcompinit && bashcompinit``) completes subcommands, their options, the
choices of options that have them, and file names where an option takes a
file.
"""

from __future__ import annotations

import argparse

#: Options whose value is a file name.
FILE_OPTIONS = frozenset({"--kernel", "--initrd", "--symbols"})


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(every option string, choices by option, options that take a value)."""
    names: list[str] = []
    choices: dict[str, list[str]] = {}
    valued: list[str] = []
    for action in parser._actions:
        names += action.option_strings
        if not action.option_strings and action.choices and not isinstance(
            action, argparse._SubParsersAction
        ):  # a positional with choices
            names += [str(c) for c in action.choices]
        if action.option_strings and action.nargs != 0:
            valued += action.option_strings
            if action.choices:
                for opt in action.option_strings:
                    choices[opt] = [str(c) for c in action.choices]
    return names, choices, valued


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for ``parser``'s program."""
    prog = parser.prog
    subs = _subparsers(parser)
    top, _, _ = _options(parser)
    cases = []
    for name, sub in subs.items():
        names, choices, valued = _options(sub)
        value_cases = []
        for opt, values in sorted(choices.items()):
            value_cases.append(f'        {opt}) COMPREPLY=($(compgen -W "{" ".join(values)}" '
                               '-- "$cur")); return;;')  # fmt: skip
        files = [o for o in valued if o in FILE_OPTIONS]
        if files:
            value_cases.append(f'        {"|".join(files)}) COMPREPLY=($(compgen -f -- "$cur")); '
                               "return;;")  # fmt: skip
        others = [o for o in valued if o not in choices and o not in FILE_OPTIONS]
        if others:
            value_cases.append(f'        {"|".join(others)}) return;;')
        body = "\n".join(value_cases)
        cases.append(
            f"    {name})\n"
            f'      case "$prev" in\n{body}\n      esac\n'
            f'      COMPREPLY=($(compgen -W "{" ".join(names)}" -- "$cur"));;'
        )
    func = "_" + prog.replace("-", "_")
    return f"""# bash completion for {prog}: eval "$({prog} completion bash)"
{func}() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} cmd="" i
  for ((i = 1; i < COMP_CWORD; i++)); do
    case "${{COMP_WORDS[i]}}" in
      --) return;;
      -*) ;;
      *) cmd=${{COMP_WORDS[i]}}; break;;
    esac
  done
  if [ -z "$cmd" ]; then
    COMPREPLY=($(compgen -W "{" ".join([*subs, *top])}" -- "$cur"))
    return
  fi
  case "$cmd" in
{chr(10).join(cases)}
  esac
}}
complete -o default {func} {prog}
"""
