"""lab.exec's command line: which words reach the guest, as an argv or as a shell line."""

from __future__ import annotations

import pytest

from harness.errors import SocklabError
from harness.guest.remote import guest_command, words_after_dashes


def test_the_words_after_the_dashes_are_taken_from_argv_untouched():
    argv = ["invoke", "lab.exec", "client", "--", "python3", "-c", "import sys; print(sys.argv[1:])", "a b", "c"]
    assert words_after_dashes(argv, "joined by invoke") == ["python3", "-c", "import sys; print(sys.argv[1:])", "a b", "c"]


def test_only_the_first_dashes_separate():
    assert words_after_dashes(["invoke", "lab.exec", "s", "--", "grep", "--", "-x"], "") == ["grep", "--", "-x"]


def test_without_dashes_in_argv_invoke_s_remainder_is_one_shell_line():
    assert words_after_dashes(["pytest"], "ss -tln | grep 22") == ["ss -tln | grep 22"]
    assert words_after_dashes(["pytest"], "  ") == []


@pytest.mark.parametrize("words,command", [
    (["ss", "-tln"], ["ss", "-tln"]),
    (["sh", "-c", "ls -l /proc/[0-9]*/fd | head"], ["sh", "-c", "ls -l /proc/[0-9]*/fd | head"]),
    (["ss -tln | grep 7000"], "ss -tln | grep 7000"),
    (["ss -tln"], "ss -tln"),
    (["echo $HOME"], "echo $HOME"),
    (["uptime"], ["uptime"]),
    (["net.core.somaxconn=4"], ["net.core.somaxconn=4"]),  # no shell syntax: not an assignment
])
def test_a_lone_word_with_shell_syntax_is_a_shell_line_and_anything_else_an_argv(words, command):
    assert guest_command(words) == command


def test_no_command_is_bad_input():
    with pytest.raises(SocklabError, match="no command: put it after --"):
        guest_command([])
