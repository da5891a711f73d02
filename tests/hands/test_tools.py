"""The bash and text editor tools in a real bwrap sandbox, with Anthropic's tool semantics."""

from __future__ import annotations

import itertools

import pytest

from hands.client import HandsClient
from managed_agents.v1 import hands_pb2

_ids = itertools.count()


async def run(
    hands: HandsClient, sandbox: str, name: str = "bash", timeout: float | None = None, **tool_input: object
) -> hands_pb2.ExecuteResponse:
    return await hands.execute(sandbox, execution_id=f"call-{next(_ids)}", name=name, input=tool_input, timeout=timeout)


async def edit(hands: HandsClient, sandbox: str, **tool_input: object) -> hands_pb2.ExecuteResponse:
    return await hands.execute(
        sandbox, execution_id=f"call-{next(_ids)}", name="str_replace_based_edit_tool", input=tool_input
    )


async def test_list_tools_offers_claudes_trained_tools(hands: HandsClient) -> None:
    tools = {t.name: t for t in await hands.list_tools()}
    assert tools["bash"].anthropic_type == "bash_20250124"
    assert tools["str_replace_based_edit_tool"].anthropic_type == "text_editor_20250728"
    assert "command" in tools["bash"].input_schema.fields["properties"].struct_value.fields
    assert not any(t.safe_to_retry for t in tools.values())


async def test_shell_state_persists_between_calls(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    first = await run(hands, sandbox, command="mkdir -p sub && cd sub && export GREETING=hi; sleep 60 &")
    assert not first.is_error and first.exit_code == 0
    # The background job outlived its call (counted in /proc: `jobs` differs between bash and ash).
    second = await run(hands, sandbox, command="pwd; echo $GREETING; grep -lx sleep /proc/[0-9]*/comm | wc -l")
    assert second.output.split() == ["/workspace/sub", "hi", "1"]
    restarted = await run(hands, sandbox, restart=True)
    assert restarted.output == "The shell was restarted."
    fresh = await run(hands, sandbox, command="pwd; echo ${GREETING:-unset}")
    assert fresh.output.split() == ["/workspace", "unset"]


async def test_stdout_and_stderr_are_interleaved_and_exit_codes_reported(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    result = await run(
        hands, sandbox, command="echo out; echo err >&2; echo again; exit_code() { return 3; }; exit_code"
    )
    assert result.output == "out\nerr\nagain\n"
    assert result.exit_code == 3 and result.is_error
    assert result.status == hands_pb2.EXECUTION_STATUS_COMPLETED


async def test_a_timeout_returns_partial_output_and_the_shell_stays_usable(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    await run(hands, sandbox, command="cd /tmp")
    slow = await run(hands, sandbox, timeout=1, command="echo started; sleep 30; echo never")
    assert slow.status == hands_pb2.EXECUTION_STATUS_TIMED_OUT and slow.is_error
    assert slow.output.startswith("started\n") and "never" not in slow.output
    assert "did not finish within 1 s" in slow.output and "still usable" in slow.output
    after = await run(hands, sandbox, command="pwd")
    assert after.output == "/tmp\n", "the shell (and its cwd) survived the timeout"


async def test_a_loop_in_the_shell_itself_is_interrupted_and_the_shell_kept(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    await run(hands, sandbox, command="cd /tmp")
    looping = await run(hands, sandbox, timeout=1, command="while true; do :; done")
    assert looping.status == hands_pb2.EXECUTION_STATUS_TIMED_OUT and "still usable" in looping.output
    assert (await run(hands, sandbox, command="pwd")).output == "/tmp\n"


async def test_a_shell_loop_that_ignores_signals_is_stopped_and_the_shell_keeps_its_state(hands: HandsClient) -> None:
    # Every command runs in a child of the shell's driver, so even a loop of shell builtins that ignores
    # signals is a process that the time limit can kill, and the shell itself carries on.
    sandbox = (await hands.provision()).id
    await run(hands, sandbox, command="cd /tmp && export KEPT=yes")
    stuck = await run(hands, sandbox, timeout=1, command="trap '' INT TERM HUP; while true; do :; done")
    assert stuck.status == hands_pb2.EXECUTION_STATUS_TIMED_OUT
    assert "the shell is still usable" in stuck.output
    assert (await run(hands, sandbox, command="echo $KEPT $(pwd)")).output == "yes /tmp\n"


async def test_huge_output_is_cut_in_the_middle_with_a_marker(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    result = await run(hands, sandbox, command="echo FIRST; head -c 500000 /dev/zero | tr '\\0' x; echo; echo LAST")
    assert result.truncated
    assert result.output.startswith("FIRST") and result.output.rstrip().endswith("LAST")
    assert "bytes of output cut here" in result.output
    assert len(result.output) < 31_000


async def test_the_editor_creates_views_and_edits_files(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    created = await edit(
        hands, sandbox, command="create", path="/workspace/pkg/mod.py", file_text="a = 1\nb = 2\nc = 3\n"
    )
    assert created.output == "File created successfully at: /workspace/pkg/mod.py"
    view = await edit(hands, sandbox, command="view", path="pkg/mod.py", view_range=[2, 3])
    assert view.output.endswith("     2\tb = 2\n     3\tc = 3")
    replaced = await edit(
        hands, sandbox, command="str_replace", path="/workspace/pkg/mod.py", old_str="b = 2", new_str="b = 20"
    )
    assert not replaced.is_error and "b = 20" in replaced.output
    inserted = await edit(
        hands, sandbox, command="insert", path="/workspace/pkg/mod.py", insert_line=0, insert_text="# header"
    )
    assert not inserted.is_error
    content = await run(hands, sandbox, command="cat pkg/mod.py")
    assert content.output == "# header\na = 1\nb = 20\nc = 3\n"
    listing = await edit(hands, sandbox, command="view", path="/workspace")
    assert "/workspace/pkg/mod.py" in listing.output


@pytest.mark.parametrize(
    ("tool_input", "message"),
    [
        (
            {"command": "str_replace", "path": "/workspace/f.txt", "old_str": "zzz", "new_str": "y"},
            "did not appear verbatim",
        ),
        ({"command": "str_replace", "path": "/workspace/f.txt", "old_str": "same", "new_str": "y"}, "occurs 2 times"),
        ({"command": "view", "path": "/workspace/f.txt", "view_range": [5, 1]}, "view_range"),
        ({"command": "view", "path": "/workspace/missing.txt"}, "does not exist"),
        ({"command": "insert", "path": "/workspace/f.txt", "insert_line": 99, "insert_text": "x"}, "insert_line"),
        ({"command": "delete", "path": "/workspace/f.txt"}, "unknown command"),
        ({"command": "view"}, "path is required"),
    ],
)
async def test_editor_mistakes_are_error_results(
    hands: HandsClient, tool_input: dict[str, object], message: str
) -> None:
    sandbox = (await hands.provision()).id
    await edit(hands, sandbox, command="create", path="/workspace/f.txt", file_text="same\nsame\n")
    result = await edit(hands, sandbox, **tool_input)
    assert result.is_error and message in result.output
    assert (await run(hands, sandbox, command="cat f.txt")).output == "same\nsame\n", "nothing was written"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../outside.txt", "outside the workspace"),
        ("/etc/hostname", "outside the workspace"),
        ("/workspace/../etc/hostname", "outside the workspace"),
        # The editor follows no symlink at all, wherever it points (tests/hands/test_editor_boundary.py).
        ("/workspace/link/hostname", "/workspace/link is a symbolic link; the editor does not follow links"),
        ("/workspace/link", "/workspace/link is a symbolic link; the editor does not follow links"),
    ],
)
async def test_paths_that_escape_the_workspace_are_refused(hands: HandsClient, path: str, message: str) -> None:
    sandbox = (await hands.provision()).id
    await run(hands, sandbox, command="ln -s /etc /workspace/link")
    viewed = await edit(hands, sandbox, command="view", path=path)
    written = await edit(hands, sandbox, command="create", path=path, file_text="pwned")
    for result in (viewed, written):
        assert result.is_error and message in result.output


async def test_unknown_tools_and_bad_input_are_error_results(hands: HandsClient) -> None:
    sandbox = (await hands.provision()).id
    unknown = await run(hands, sandbox, "rm_rf", command="ls")
    assert unknown.is_error and unknown.status == hands_pb2.EXECUTION_STATUS_REJECTED
    assert "no tool named 'rm_rf'" in unknown.output
    empty = await run(hands, sandbox)
    assert empty.is_error and "command is required" in empty.output
    wrong_type = await run(hands, sandbox, command=["ls"])
    assert wrong_type.is_error
