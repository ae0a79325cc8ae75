"""Readers and writers on real slices of ../shared/data, and every kind of bad input."""

from __future__ import annotations

import json

import pytest

from configs.errors import RecordError
from tasks.data import (Record, load_canonical, read_jsonl, read_records, record_id, save_canonical, to_format,
                        write_records)
from tests.conftest import DATA


def _sharegpt_rows():
    """Real ShareGPT conversations: the DPO demo's prompts with their chosen answers."""
    rows = json.loads((DATA / "dpo_en_20.json").read_text())
    return [{"conversations": r["conversations"] + [r["chosen"]]} for r in rows]


def test_alpaca_json_reads_real_slice():
    result = read_records(DATA / "alpaca_demo_200.json")
    assert result.format == "alpaca" and len(result.records) == 200 and not result.rejects
    first = json.loads((DATA / "alpaca_demo_200.json").read_text())[0]
    rec = result.records[0]
    assert rec.alpaca_fields() == (first["instruction"], first["input"], first["output"])
    assert rec.messages[-1] == {"role": "assistant", "content": first["output"]}
    assert rec.location == "record 0"


def test_alpaca_input_joins_instruction_and_ids_are_stable():
    rows = json.loads((DATA / "alpaca_cherry_40.json").read_text())
    with_input = next(r for r in rows if r["input"])
    rec = read_records(DATA / "alpaca_cherry_40.json").records[rows.index(with_input)]
    assert rec.messages[0]["content"] == with_input["instruction"] + "\n\n" + with_input["input"]
    assert rec.id == record_id(rec.messages) and len(rec.id) == 16
    again = read_records(DATA / "alpaca_cherry_40.json").records[rows.index(with_input)]
    assert again.id == rec.id


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "source"])
def test_round_trip_through_every_writer(tmp_path, fmt):
    records = read_records(DATA / "alpaca_cherry_40.json").records
    out = tmp_path / f"out-{fmt}.jsonl"
    write_records(records, out, fmt)
    back = read_records(out).records
    assert [r.messages for r in back] == [r.messages for r in records]
    assert [r.id for r in back] == [r.id for r in records]


def test_sharegpt_and_messages_multi_turn(tmp_path):
    rows = _sharegpt_rows()
    rows.append({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Name a colour."},
                                   {"from": "gpt", "value": "Blue."}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows))
    records = read_records(path).records
    assert len(records) == len(rows)
    multi = records[-1]
    assert multi.system == "Be brief." and multi.turns() == [("Hi", "Hello."), ("Name a colour.", "Blue.")]
    # messages out, then in again: same conversation, same id
    out = tmp_path / "messages.jsonl"
    write_records(records, out, "messages")
    back = read_records(out).records
    assert back[-1].messages == multi.messages and back[-1].id == multi.id
    # alpaca out keeps the earlier turns as `history`
    alpaca = to_format(multi, "alpaca")
    assert alpaca["history"] == [["Hi", "Hello."]] and alpaca["output"] == "Blue." and alpaca["system"] == "Be brief."
    assert read_records(_write(tmp_path / "a.json", [alpaca])).records[0].messages == multi.messages


def test_a_sharegpt_top_level_system_prompt_is_the_first_message(tmp_path):
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    record = read_records(_write(tmp_path / "s.json", [{"system": "Be brief.", "conversations": turns}])).records[0]
    assert record.messages[0] == {"role": "system", "content": "Be brief."} and record.system == "Be brief."
    assert record.turns() == [("Hi", "Hello.")]
    # a new answer keeps the prompt where the user put it, so the row still reads back the same way
    answered = record.with_response("Hey.")
    assert answered.source["system"] == "Be brief." and answered.source["conversations"][0]["from"] == "human"
    write_records([answered], tmp_path / "back.jsonl", "source")
    assert read_records(tmp_path / "back.jsonl").records[0].messages == answered.messages


def test_a_sharegpt_system_prompt_given_twice_is_an_error(tmp_path):
    row = {"system": "Be brief.", "conversations": [{"from": "system", "value": "Be kind."},
                                                    {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    with pytest.raises(RecordError, match=r"record 0, field 'system': a top-level system prompt and a system turn"):
        read_records(_write(tmp_path / "s.json", [row]))


def test_source_format_writes_the_users_row_back(tmp_path):
    rows = _sharegpt_rows()[:5]
    for r in rows:
        r["extra_field"] = "kept"
    records = read_records(_write(tmp_path / "s.json", rows)).records
    write_records(records, tmp_path / "back.jsonl", "source")
    assert read_jsonl(tmp_path / "back.jsonl") == rows


def test_a_selection_writes_the_users_own_rows_back(tmp_path):
    """Real ShareGPT rows (roles `user`, `chatgpt`, a first `system` turn) come back from a selection as read."""
    from configs.schema import DataConfig
    from configs.selection import FullSelection
    from tasks.data import prepare_records
    from tasks.select import baseline_selection

    rows = json.loads((DATA / "sharegpt_v3_41.json").read_text())
    kept = read_records(DATA / "sharegpt_v3_41.json", on_error="skip").records
    assert {t["from"] for r in kept for t in r.source["conversations"]} >= {"user", "chatgpt", "system"}
    records = prepare_records(DataConfig(path=str(DATA / "sharegpt_v3_41.json"), on_error="skip"))
    subset = baseline_selection(records, FullSelection())
    assert read_jsonl(subset.file("subset.jsonl")) == [rows[int(r.location.split()[-1])] for r in kept]


def test_with_response_replaces_the_answer_in_the_source_format():
    rec = read_records(DATA / "alpaca_cherry_40.json").records[0]
    new = rec.with_response("A different answer.")
    assert new.source["output"] == "A different answer." and new.response == "A different answer."
    assert new.id != rec.id and rec.response != "A different answer."


def test_with_response_keeps_the_users_sharegpt_row_and_changes_only_the_reply(tmp_path):
    """GRAPE writes its winner back in the user's format: their role names (`user`, `chatgpt`), turn keys and
    fields stay; only the last reply's text changes."""
    row = {"id": "x_0", "conversations": [
        {"from": "user", "value": "Hi", "lang": "en"}, {"from": "chatgpt", "value": "Hello."},
        {"from": "user", "value": "Name a colour."}, {"from": "chatgpt", "value": "Blue.", "lang": "en"}]}
    rec = read_records(_write(tmp_path / "s.json", [row])).records[0]
    new = rec.with_response("Red.")
    expected = json.loads(json.dumps(row))
    expected["conversations"][-1]["value"] = "Red."
    assert new.source == expected and rec.source == row  # the record it came from is unchanged
    assert new.response == "Red." and new.messages[:-1] == rec.messages[:-1]
    write_records([new], tmp_path / "back.jsonl", "source")
    assert read_jsonl(tmp_path / "back.jsonl") == [expected]
    assert read_records(tmp_path / "back.jsonl").records[0].id == new.id


def test_with_response_keeps_the_users_messages_row(tmp_path):
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "Hi", "name": "ann"},
                        {"role": "bot", "content": "Hello."}], "meta": {"k": 1}}
    rec = read_records(_write(tmp_path / "m.json", [row])).records[0]
    expected = json.loads(json.dumps(row))
    expected["messages"][-1]["content"] = "Hey."
    assert rec.with_response("Hey.").source == expected


def test_with_response_on_an_unanswered_row_appends_a_reply_named_as_the_rows_others(tmp_path):
    rows = [{"conversations": [{"from": "user", "value": "Hi"}, {"from": "chatgpt", "value": "Hello."},
                               {"from": "user", "value": "Bye?"}]},
            {"conversations": [{"from": "human", "value": "Say hi."}]}]
    first, second = read_records(_write(tmp_path / "s.json", rows), require_response=False).records
    assert first.with_response("Bye.").source["conversations"] == rows[0]["conversations"] + [
        {"from": "chatgpt", "value": "Bye."}]
    assert second.with_response("Hi.").source["conversations"] == rows[1]["conversations"] + [
        {"from": "gpt", "value": "Hi."}]  # no reply to take the name from: ShareGPT's own


def test_parquet_and_saved_hf_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads((DATA / "alpaca_cherry_40.json").read_text())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert [r.id for r in read_records(tmp_path / "d.parquet").records] == \
        [r.id for r in read_records(DATA / "alpaca_cherry_40.json").records]
    datasets.Dataset.from_list(_sharegpt_rows()).save_to_disk(str(tmp_path / "hf"))
    hf = read_records(tmp_path / "hf")
    assert hf.format == "sharegpt" and len(hf.records) == 20


def test_canonical_store_round_trip(tmp_path):
    records = read_records(DATA / "alpaca_cherry_40.json").records
    save_canonical(records, tmp_path / "records.jsonl")
    back = load_canonical(tmp_path / "records.jsonl")
    assert [(r.id, r.messages, r.source) for r in back] == [(r.id, r.messages, r.source) for r in records]
    assert isinstance(back[0], Record)


def test_instruction_only_rows_need_require_response_false(tmp_path):
    path = _write(tmp_path / "i.json", [{"instruction": "Name a fruit."}])
    with pytest.raises(RecordError, match="field 'output': missing field"):
        read_records(path)
    assert read_records(path, require_response=False).records[0].turns() == [("Name a fruit.", None)]


# ------------------------------------------------------------------------------------------------- bad input
def _write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def _jsonl_with_bad_lines(tmp_path):
    good = json.loads((DATA / "alpaca_cherry_40.json").read_text())[:3]
    lines = [json.dumps(good[0]).encode(),
             b'{"instruction": "broken", ',                                           # 2: invalid JSON
             json.dumps({"instruction": "no output"}).encode(),                       # 3: missing field
             json.dumps({"instruction": "  ", "output": "x"}).encode(),               # 4: empty field
             json.dumps({"instruction": ["a"], "output": "x"}).encode(),              # 5: wrong type
             b'{"instruction": "caf\xe9", "output": "x"}',                             # 6: not UTF-8
             json.dumps(good[0]).encode(),                                            # 7: duplicate
             json.dumps(good[1]).encode(),
             b'["not", "an", "object"]',                                              # 9: wrong type (row)
             json.dumps(good[2]).encode()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("line, field, reason", [
    (2, None, "invalid JSON"), (3, "output", "missing field"), (4, "instruction", "empty field"),
    (5, "instruction", "wrong type"), (6, None, "not UTF-8"), (7, "id", "duplicate id"), (9, None, "wrong type"),
])
def test_each_bad_line_raises_naming_file_line_and_field(tmp_path, line, field, reason):
    lines = _jsonl_with_bad_lines(tmp_path).read_bytes().split(b"\n")
    # the first (good) line, then the bad one: a duplicate needs its twin before it
    path = tmp_path / "one-bad.jsonl"
    path.write_bytes(lines[0] + b"\n" + lines[line - 1] + b"\n")
    with pytest.raises(RecordError) as err:
        read_records(path)
    assert err.value.location == "line 2" and err.value.field == field
    assert reason in err.value.reason and str(path) in str(err.value)


def test_skip_mode_counts_and_keeps_every_reject(tmp_path):
    path = _jsonl_with_bad_lines(tmp_path)
    result = read_records(path, on_error="skip")
    assert len(result.records) == 3
    assert [r["location"] for r in result.rejects] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 9)]
    counts = result.counts
    assert counts["records_read"] == 10 and counts["records_rejected"] == 7
    assert counts["rejected[invalid JSON]"] == 1 and counts["rejected[missing field]"] == 1
    assert all(r["file"] == str(path) and r["reason"] for r in result.rejects)


def test_bad_sharegpt_and_messages_name_the_turn(tmp_path):
    path = _write(tmp_path / "c.json", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}])
    with pytest.raises(RecordError, match=r"record 0, field 'conversations\[1\].from': unknown role: 'robot'"):
        read_records(path)
    path = _write(tmp_path / "m.json", [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}])
    with pytest.raises(RecordError, match="roles must alternate"):
        read_records(path)
    path = _write(tmp_path / "m2.json", [{"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(RecordError, match=r"messages\[0\].content': wrong type"):
        read_records(path)


# Real ShareGPT V3 conversations (tests/data/README.md): record -> (field, reason) of each one pomona must refuse.
SHAREGPT_REJECTS = {
    0: ("conversations[0].from", ("roles must alternate user/assistant: 'gpt' (assistant) where a user turn belongs "
                                  "(a conversation starts with a user turn; ShareGPT's later parts of a split "
                                  "conversation open with a reply: data.leading_reply: drop leaves that reply out")),
    1: ("conversations[0].from", "roles must alternate"), 2: ("conversations[0].from", "roles must alternate"),
    3: ("conversations[1].from", ("roles must alternate user/assistant: 'human' (user) where an assistant turn "
                                  "belongs (conversations[0] is already a user turn)")),
    4: ("conversations[2].from", ("roles must alternate user/assistant: 'human' (user) where an assistant turn "
                                  "belongs (conversations[1] is already a user turn)")),
    5: ("conversations[0].from", "roles must alternate"),
    6: ("conversations[3].value", "empty field"), 7: ("conversations[4].value", "empty field"),
    8: ("conversations", "empty field: the list of turns is empty"),
    9: ("conversations[12]", "no final assistant response: the conversation ends on a user turn"),
    10: ("conversations", "no user turn: the conversation holds only a system prompt"), 11: ("conversations", "no user turn"),
    18: ("conversations[1]", "no final assistant response"),
    28: ("id", "duplicate id: 5bacc6545d4e0e06 is the same conversation as record 27"),
}


def test_real_sharegpt_rejects_name_the_turn_and_count_by_kind():
    """Conversations that open with gpt, two human turns in a row, empty values, an empty list, a
    system turn alone (it raised IndexError), a duplicate: each is a reject naming its turn, and the counts have one
    key per kind of problem (not one per duplicate's id or per unknown role)."""
    result = read_records(DATA / "sharegpt_v3_41.json", on_error="skip")
    got = {int(r["location"].split()[1]): (r["field"], r["reason"]) for r in result.rejects}
    assert sorted(got) == sorted(SHAREGPT_REJECTS)
    for n, (field, reason) in SHAREGPT_REJECTS.items():
        assert got[n][0] == field and got[n][1].startswith(reason), (n, got[n])
    assert result.counts == {
        "records_read": 41, "records_kept": 27, "records_rejected": 14, "rejected[duplicate id]": 1,
        "rejected[empty field]": 3, "rejected[no user turn]": 2, "rejected[roles must alternate user/assistant]": 6,
        "rejected[no final assistant response]": 2}
    kept = {r.location: r for r in result.records}
    # a system turn before the first human turn stays the system message; "user" and "chatgpt" are aliases
    assert [m["role"] for m in kept["record 12"].messages] == ["system", "user", "assistant"]
    assert [m["role"] for m in kept["record 14"].messages] == ["system", "user", "assistant"]
    assert [m["role"] for m in kept["record 16"].messages] == ["user", "assistant"]
    assert len(kept["record 26"].turns()) == 14
    # `bing` and `bard` answer as `gpt` does (answers of those chat products, as `chatgpt` is)
    assert [m["role"] for m in kept["record 15"].messages] == ["system", "user", "assistant"]
    assert [m["role"] for m in kept["record 19"].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_leading_reply_drop_keeps_the_later_parts_of_split_sharegpt_conversations(tmp_path):
    """Records 0-2 are later parts (`..._27`, `..._21`, `..._39`) that open with gpt: `drop` keeps each without
    that reply and lists it; record 5 opens with two gpt turns and is still refused, naming the second."""
    from configs.schema import DataConfig
    from tasks.data import prepare_records

    rows = json.loads((DATA / "sharegpt_v3_41.json").read_text())
    result = read_records(DATA / "sharegpt_v3_41.json", on_error="skip", leading_reply="drop")
    kept = {r.location: r for r in result.records}
    for n in (0, 1, 2):
        turns = rows[n]["conversations"]
        assert [m["content"] for m in kept[f"record {n}"].messages] == [t["value"] for t in turns[1:]]
        assert kept[f"record {n}"].source == rows[n]  # the user's row stays whole
    assert [(r["location"], r["field"], r["dropped"]["content"]) for r in result.repairs] == [
        (f"record {n}", "conversations[0]", rows[n]["conversations"][0]["value"]) for n in (0, 1, 2)]
    got = {r["location"]: (r["field"], r["reason"]) for r in result.rejects}
    assert got["record 5"] == ("conversations[1].from", "roles must alternate user/assistant: 'gpt' (assistant) "
                               "where a user turn belongs (conversations[0] is already an assistant turn)")
    assert result.counts["records_kept"] == 30 and result.counts["records_opening_reply_dropped"] == 3
    # the default still refuses them
    assert len(read_records(DATA / "sharegpt_v3_41.json", on_error="skip").records) == 27

    out = prepare_records(DataConfig(path=str(DATA / "sharegpt_v3_41.json"), on_error="skip", leading_reply="drop"))
    assert [r["location"] for r in read_jsonl(out.file("repairs.jsonl"))] == ["record 0", "record 1", "record 2"]
    assert out.metrics["records_opening_reply_dropped"] == 3 and out.metrics["records_kept"] == 30


def test_leading_reply_drop_after_a_system_prompt_and_with_nothing_left(tmp_path):
    system_first = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Sure."},
                                 {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    reply_only = {"conversations": [{"from": "gpt", "value": "the end of a long answer"}]}
    result = read_records(_write(tmp_path / "m.json", [system_first]), leading_reply="drop")
    assert [m["role"] for m in result.records[0].messages] == ["system", "user", "assistant"]
    assert result.repairs[0]["field"] == "messages[1]"
    with pytest.raises(RecordError, match=r"no user turn: .* and the opening reply that data.leading_reply: drop "
                                          "left out"):
        read_records(_write(tmp_path / "s.json", [reply_only]), leading_reply="drop")


def test_an_unknown_role_is_a_reject_naming_the_turn(tmp_path):
    turns = [{"from": "human", "value": "Hi"}, {"from": "narrator", "value": "Hello."}]
    with pytest.raises(RecordError, match=r"record 0, field 'conversations\[1\].from': unknown role: 'narrator' is "
                                          "none of human, user, gpt, .*chatgpt, bing, bard, system"):
        read_records(_write(tmp_path / "s.json", [{"conversations": turns}]))


def test_a_sharegpt_system_turn_alone_is_a_record_error_not_an_index_error(tmp_path):
    rows = json.loads((DATA / "sharegpt_v3_41.json").read_text())
    for require_response in (True, False):
        with pytest.raises(RecordError, match=r"record 0, field 'conversations': no user turn"):
            read_records(_write(tmp_path / "s.json", [rows[10]]), require_response=require_response)


def test_broken_json_array_is_fatal_with_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": \n]')
    with pytest.raises(RecordError, match="line 4: invalid JSON"):
        read_records(path, on_error="skip")
    path.write_bytes(b'[\n{"instruction": "\xff", "output": "b"}]')
    with pytest.raises(RecordError, match="line 2: not UTF-8"):
        read_records(path)


def test_a_folder_that_is_no_saved_dataset_and_a_corrupt_parquet_name_the_accepted_inputs(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    with pytest.raises(RecordError, match=r"folder, folder: not a saved Hugging Face dataset .*: give .*\.jsonl"):
        read_records(tmp_path / "folder", on_error="skip")
    (tmp_path / "cut.parquet").write_bytes(b"PAR1" + b"x" * 16 + b"PAR1")
    with pytest.raises(RecordError, match=r"cut.parquet, file: not a readable parquet file \(.*\): give .*save_to_disk"):
        read_records(tmp_path / "cut.parquet", on_error="skip")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(RecordError, match="unknown format"):
        read_records(_write(tmp_path / "u.json", [{"question": "a"}]))
    with pytest.raises(RecordError, match="no such file"):
        read_records(tmp_path / "missing.json")


def test_a_pool_with_no_usable_record_fails_in_the_records_stage(tmp_path):
    """Not later, as an empty subset that reports success or as another stage's message about its internals."""
    from configs.schema import DataConfig
    from tasks.data import prepare_records

    empty = _write(tmp_path / "empty.json", [])
    with pytest.raises(RecordError, match="no records in it") as err:
        prepare_records(DataConfig(path=str(empty)))
    assert str(err.value).startswith(f"{empty}, whole file:")
    bad = tmp_path / "all-bad.jsonl"
    bad.write_bytes(b'{"instruction": "broken", \n' + json.dumps({"instruction": "no output"}).encode() + b"\n")
    with pytest.raises(RecordError) as err:
        prepare_records(DataConfig(path=str(bad), on_error="skip"))
    message = str(err.value)
    assert message.startswith(f"{bad}, whole file: all 2 records read were rejected (invalid JSON 1, missing field 1)")
    rejects = message.rsplit(" in ", 1)[1].rstrip(")")
    assert [r["location"] for r in read_jsonl(rejects)] == ["line 1", "line 2"]


# ------------------------------------------------------------------------------------------- baseline selections
def _record(rid: str, *answers: str) -> Record:
    messages = []
    for turn, answer in enumerate(answers):
        messages += [{"role": "user", "content": f"question {turn}"}, {"role": "assistant", "content": answer}]
    return Record(rid, messages, "messages", {"messages": messages})


def test_longest_keeps_the_longest_responses_over_all_turns_ties_in_input_order():
    from tasks.select import select_longest

    records = [_record("a", "xx"), _record("b", "xxxxx"), _record("c", "xxx", "xxx"), _record("d", "x"),
               _record("e", "xxxxx")]
    # lengths a 2, b 5, c 6 (two turns), d 1, e 5: the top three are c, b, e; output keeps input order
    assert select_longest(records, 3) == ["b", "c", "e"]
    assert select_longest(records, 2) == ["b", "c"]  # b and e tie at 5: the earlier one wins


def test_random_follows_its_seed_and_keeps_input_order():
    import random

    from tasks.select import select_random

    ids = [f"r{i}" for i in range(50)]
    picked = select_random(ids, 10, seed=3)
    assert picked == [i for i in ids if i in set(random.Random(3).sample(ids, 10))]
    assert picked != select_random(ids, 10, seed=4) and picked == select_random(ids, 10, seed=3)


def test_a_selection_that_keeps_nothing_is_an_error_not_an_empty_subset(tmp_path):
    from configs.errors import ConfigError
    from tasks.select import write_subset

    with pytest.raises(ConfigError, match="random: the selection kept none of the 2 candidates"):
        write_subset([_record("a", "x"), _record("b", "y")], [], tmp_path, "random")
    assert not (tmp_path / "subset.jsonl").exists()


def test_a_lone_surrogate_is_a_reject_naming_its_field_and_the_rejects_file_can_hold_it(tmp_path):
    """JSON's "\\ud83d" without its pair (text cut inside an emoji) is no character: it crashed the whole read with
    a UnicodeEncodeError (hashing the record), naming nothing, even with on_error=skip."""
    from tasks.data import write_jsonl

    text = ('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "cut \\ud83d"}]},'
            ' {"id": "x\\udc00", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},'
            ' {"conversations": [{"from": "human", "value": "smile \\ud83d\\ude00"}, {"from": "gpt", "value": "ok"}]}]')
    path = tmp_path / "s.json"
    path.write_text(text)
    result = read_records(path, on_error="skip")
    assert [r.messages[0]["content"] for r in result.records] == ["smile \U0001F600"]  # a whole pair is fine
    assert [(r["location"], r["field"]) for r in result.rejects] == [("record 0", "conversations[1].value"),
                                                                     ("record 1", "id")]
    assert result.rejects[0]["reason"].startswith("invalid unicode: lone surrogate U+D83D at character 4")
    assert result.counts["rejected[invalid unicode]"] == 2
    write_jsonl(tmp_path / "rejects.jsonl", result.rejects)
    assert read_jsonl(tmp_path / "rejects.jsonl")[0]["raw"]["conversations"][1]["value"] == "cut \\ud83d"
    with pytest.raises(RecordError, match=r"record 0, field 'conversations\[1\].value': invalid unicode"):
        read_records(path)


def test_a_rejected_turn_keeps_its_whole_conversation_in_the_rejects_file():
    """An empty or missing value used to put only that turn in `raw`: the rest of the conversation was lost."""
    result = read_records(DATA / "sharegpt_v3_41.json", on_error="skip")
    rows = json.loads((DATA / "sharegpt_v3_41.json").read_text())
    empty = [r for r in result.rejects if r["reason"] == "empty field" and r["field"].startswith("conversations[")]
    assert len(empty) == 2
    for reject in empty:
        assert reject["raw"] == rows[int(reject["location"].split()[1])]


def test_a_cut_off_json_array_says_so_and_how_to_keep_the_good_records(tmp_path):
    """The ShareGPT V3 file as distributed ends inside a record: the error read 'Unterminated string starting at at
    column 18' and did not say that nothing was read, with on_error=skip either, or what to do."""
    text = (DATA / "sharegpt_v3_41.json").read_text()
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex('"value"') + 20])
    with pytest.raises(RecordError, match=r"line \d+: invalid JSON: Unterminated string starting at \(column \d+\) "
                                          r"\(the file ends inside it: cut off\?\); .*no record of it was read, even "
                                          r"with on_error=skip: .*JSONL"):
        read_records(path, on_error="skip")
    path.write_text(text[: text.index("},\n {") + 1] + "\n")  # one whole record, the array never closed
    with pytest.raises(RecordError, match=r"cut off\?"):
        read_records(path)


@pytest.mark.parametrize("history", ["", 0, {}, "Hi -> Hello."])
def test_an_alpaca_history_that_is_not_a_list_is_a_reject_not_no_history(tmp_path, history):
    path = _write(tmp_path / "h.json", [{"instruction": "a", "output": "b", "history": history}])
    with pytest.raises(RecordError, match=r"record 0, field 'history': wrong type: expected a list") as err:
        read_records(path)
    assert type(history).__name__ in err.value.reason
    assert read_records(path, on_error="skip").counts["rejected[wrong type]"] == 1
