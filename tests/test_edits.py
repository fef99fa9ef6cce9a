"""Edit-request files: the four record shapes, validation messages, real datasets, round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from _helpers import SHARED_DATA

from rrome.files.edits import EditRequest, dump_requests, load_requests, parse_record
from rrome.files.errors import EditFileError, InvalidFileError, RromeError

DATA = SHARED_DATA
COUNTERFACT_VAL = DATA / "counterfact" / "counterfact-val.json"
ZSRE = DATA / "zsre" / "zsre_mend_train-1k.json"

DARRIEUX = EditRequest(
    prompt="The mother tongue of {} is",
    subject="Danielle Darrieux",
    target_new="English",
    target_true="French",
    case_id="0",
    paraphrase_prompts=("Danielle Darrieux spoke the language", "Where Danielle Darrieux is from, people speak"),
    neighborhood_prompts=("The mother tongue of Léon Blum is", "Montesquieu spoke the language"),
)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def jsonl(*records: Any) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def error_lines(path: Path) -> list[str]:
    with pytest.raises(EditFileError) as info:
        load_requests(path)
    return str(info.value).splitlines()


def record_errors(obj: Any) -> list[str]:
    with pytest.raises(EditFileError) as info:
        parse_record(obj, where="x.jsonl:7")
    return str(info.value).splitlines()


def rrome_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "target_true": "French",
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not ...}


def flat_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "case_id": 2,
        "prompt": "Toko Yasuda, the",
        "target_new": "piano",
        "subject": "Toko Yasuda",
        "ground_truth": "guitar",
        "rephrase_prompt": "Toko Yasuda is incredible at",
        "locality_prompt": "John Lennon performs on the",
        "locality_ground_truth": "guitar",
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not ...}


def zsre_record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "subject": "UniFirst",
        "src": "What is the product made by UniFirst?",
        "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?",
        "alt": "unmanned aircraft",
        "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski",
        "loc_ans": "Walter Sobchak",
        "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
    }
    record.update(changes)
    return {k: v for k, v in record.items() if v is not ...}


def rome_record(**rewrite_changes: Any) -> dict[str, Any]:
    rewrite: dict[str, Any] = {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    }
    rewrite.update(rewrite_changes)
    return {
        "case_id": 0,
        "pararel_idx": 2796,
        "requested_rewrite": {k: v for k, v in rewrite.items() if v is not ...},
        "paraphrase_prompts": list(DARRIEUX.paraphrase_prompts),
        "neighborhood_prompts": list(DARRIEUX.neighborhood_prompts),
        "attribute_prompts": ["J. R. R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


# --------------------------------------------------------------------------------------------
# shapes


def test_rrome_shape() -> None:
    record = {**DARRIEUX.to_json(), "neighborhood_target": "French"}
    assert parse_record(record, where="w") == EditRequest(
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        case_id="0",
        paraphrase_prompts=DARRIEUX.paraphrase_prompts,
        neighborhood_prompts=DARRIEUX.neighborhood_prompts,
        neighborhood_target="French",
    )
    minimal = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}
    assert parse_record(minimal, where="w") == EditRequest("{} plays the", "Toko Yasuda", "piano")


def test_rome_nested_shape() -> None:
    assert parse_record(rome_record(), where="w") == DARRIEUX
    plain = rome_record(target_new="English", target_true="French")
    assert parse_record(plain, where="w") == DARRIEUX
    without_true = rome_record(target_true=...)
    assert parse_record(without_true, where="w").target_true is None


def test_flat_counterfact_shape() -> None:
    assert parse_record(flat_record(), where="w") == EditRequest(
        prompt="{}, the",
        subject="Toko Yasuda",
        target_new="piano",
        target_true="guitar",
        case_id="2",
        paraphrase_prompts=("Toko Yasuda is incredible at",),
        neighborhood_prompts=("John Lennon performs on the",),
        neighborhood_target="guitar",
    )
    # Only the first occurrence of the subject becomes the placeholder.
    twice = flat_record(prompt="Paris is the capital of France; Paris is in", subject="Paris")
    assert parse_record(twice, where="w").prompt == "{} is the capital of France; Paris is in"
    # Without any flat-only key, a prompt holding the subject (and no "{}") is read as filled in.
    bare = {"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano"}
    assert parse_record(bare, where="w") == EditRequest("{} plays the", "Toko Yasuda", "piano")


def test_zsre_shape() -> None:
    assert parse_record(zsre_record(), where="w") == EditRequest(
        prompt="What is the product made by {}?",
        subject="UniFirst",
        target_new="unmanned aircraft",
        target_true="uniform",
        paraphrase_prompts=("What will be the product of UniFirst?",),
        neighborhood_prompts=("nq question: john goodman's character in the big lebowski",),
        neighborhood_target="Walter Sobchak",
    )
    assert parse_record(zsre_record(answers=[]), where="w").target_true is None
    # target_new is kept as given, leading space included (the engine handles spaces).
    assert parse_record(zsre_record(alt=" Dickens"), where="w").target_new == " Dickens"


def test_text_fills_only_the_placeholder() -> None:
    request = EditRequest("In {0} the set {a, b} of {} is {x}", "Toko Yasuda", "piano")
    assert request.text() == "In {0} the set {a, b} of Toko Yasuda is {x}"
    start, end = request.subject_span()
    assert request.text()[start:end] == "Toko Yasuda"
    assert DARRIEUX.text() == "The mother tongue of Danielle Darrieux is"


def test_request_validates_itself() -> None:
    assert EditRequest("{} is", "s", "a", case_id=5).case_id == "5"  # type: ignore[arg-type]
    assert EditRequest("{} is", "s", "a", paraphrase_prompts=["p"]).paraphrase_prompts == ("p",)  # type: ignore[arg-type]
    with pytest.raises(EditFileError, match=r'^EditRequest: field "prompt": has no "\{\}" placeholder'):
        EditRequest("The mother tongue is", "s", "a")
    with pytest.raises(EditFileError, match=r'^EditRequest: field "target_new": equals "target_true"'):
        EditRequest("{} is", "s", "French", target_true=" French")
    with pytest.raises(EditFileError) as info:
        EditRequest("{} is", " ", "a", paraphrase_prompts=("ok", ""))
    assert str(info.value).splitlines() == [
        'EditRequest: field "subject": blank string (only whitespace)',
        'EditRequest: field "paraphrase_prompts[1]": empty string',
    ]
    with pytest.raises(EditFileError, match='field "neighborhood_prompts": expected a sequence'):
        EditRequest("{} is", "s", "a", neighborhood_prompts="one prompt")  # type: ignore[arg-type]
    assert issubclass(EditFileError, InvalidFileError) and issubclass(EditFileError, RromeError)


def test_to_json_round_trips_through_parse_record() -> None:
    requests = [
        DARRIEUX,
        EditRequest("{} plays the", "Toko Yasuda", "piano"),
        parse_record(flat_record(), where="w"),
        parse_record(zsre_record(), where="w"),
        EditRequest("{{ }} {} }{", "x {} y", "z", case_id="a b"),
    ]
    for request in requests:
        record = request.to_json()
        assert json.loads(json.dumps(record)) == record
        assert parse_record(record, where="w") == request
    assert EditRequest("{} is", "s", "a").to_json() == {"prompt": "{} is", "subject": "s", "target_new": "a"}


# --------------------------------------------------------------------------------------------
# real data


def test_counterfact_val_loads_completely() -> None:
    requests = load_requests(COUNTERFACT_VAL)
    assert len(requests) == 1919
    assert requests[0] == EditRequest(
        prompt="{}, by",
        subject="BBC One",
        target_new="Sega",
        target_true="BBC",
        case_id="10",
        paraphrase_prompts=("BBC One is my favorite product out of everything owned by",),
        neighborhood_prompts=("BBC Radio, by",),
        neighborhood_target="BBC",
    )
    raw = json.loads(COUNTERFACT_VAL.read_text(encoding="utf-8"))
    for request, record in zip(requests, raw, strict=True):
        assert request.text() == record["prompt"]
        assert request.case_id == str(record["case_id"])
        assert request.prompt.count("{}") == 1


def test_zsre_file_reports_its_no_op_records() -> None:
    lines = error_lines(ZSRE)
    path = str(ZSRE)
    assert len(lines) == 21
    assert lines[0] == (
        f'{path}: record 89: field "alt": equals one of the true answers "answers[2]" ("Chicago Bears"): '
        "the edit would change nothing"
    )
    assert lines[1] == (
        f'{path}: record 102: field "alt": equals the true answer "answers[0]" ("Carabidae"): '
        "the edit would change nothing"
    )
    assert f'{path}: record 535: field "alt": empty string' in lines
    assert lines[-1] == "... and 3 more"

    requests, skipped = load_requests(ZSRE, skip_invalid=True)
    assert len(requests) == 977
    assert [where for where, _ in skipped] == [
        f"{path}: record {n}" for n in (89, 102, 116, 158, 203, 214, 230, 273, 274, 403, 454, 488)
    ] + [f"{path}: record {n}" for n in (523, 535, 542, 597, 655, 724, 738, 785, 806, 828, 867)]
    assert requests[0].prompt == "What is the product made by {}?"
    assert all(r.case_id is None and r.target_true is not None for r in requests)


# --------------------------------------------------------------------------------------------
# validation, file by file


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write(tmp_path, "e.jsonl", jsonl(rrome_record()) + '{"prompt": "{} is",\n' + jsonl(rrome_record()))
    assert error_lines(path) == [
        f"{path}:2: malformed JSON: Expecting property name enclosed in double quotes (column 20)"
    ]


def test_malformed_json_array(tmp_path: Path) -> None:
    path = write(tmp_path, "e.json", '[\n  {"prompt": "{} is"},\n  {"subject" "x"}\n]\n')
    assert error_lines(path) == [f"{path}:3: malformed JSON: Expecting ':' delimiter (column 14)"]


def test_pretty_printed_single_object(tmp_path: Path) -> None:
    path = write(tmp_path, "e.json", json.dumps(rrome_record(), indent=2))
    (line,) = error_lines(path)
    assert line.startswith(f"{path}:1: the file holds one JSON object spread over several lines")


def test_record_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path, "e.jsonl", jsonl(rrome_record(), ["a"], "text", 3))
    assert error_lines(path) == [
        f"{path}:2: record is a JSON array, expected an object",
        f"{path}:3: record is a JSON string, expected an object",
        f"{path}:4: record is a JSON number, expected an object",
    ]


def test_unknown_and_mixed_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.json",
        json.dumps([{"question": "q", "answer": "a"}, {}, rrome_record(ground_truth="French")]),
    )
    lines = error_lines(path)
    assert lines[0].startswith(f'{path}: record 1: unknown record shape (keys: "answer", "question"); expected one of:')
    assert "zsRE" in lines[0] and "requested_rewrite" in lines[0]
    assert lines[1].startswith(f"{path}: record 2: unknown record shape (keys: none)")
    assert lines[2] == (
        f'{path}: record 3: mixes keys of rrome\'s shape ("target_true") and of flat CounterFact '
        '("ground_truth"); use one shape per record'
    )


def test_string_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.jsonl",
        jsonl(
            rrome_record(subject=...),
            rrome_record(subject=""),
            rrome_record(target_new="  "),
            rrome_record(target_new=5),
            rrome_record(target_true=["French"]),
            rrome_record(subject=None),
        ),
    )
    assert error_lines(path) == [
        f'{path}:1: field "subject": missing',
        f'{path}:2: field "subject": empty string',
        f'{path}:3: field "target_new": blank string (only whitespace)',
        f'{path}:4: field "target_new": expected a string, got number 5',
        f'{path}:5: field "target_true": expected a string, got array',
        f'{path}:6: field "subject": is null; expected a string',
    ]


def test_list_and_id_fields() -> None:
    assert record_errors(rrome_record(paraphrase_prompts="one")) == [
        'x.jsonl:7: field "paraphrase_prompts": expected an array of strings, got string'
    ]
    assert record_errors(rrome_record(neighborhood_prompts=["ok", "", 3])) == [
        'x.jsonl:7: field "neighborhood_prompts[1]": empty string',
        'x.jsonl:7: field "neighborhood_prompts[2]": expected a string, got number 3',
    ]
    assert record_errors(rrome_record(case_id=True)) == [
        'x.jsonl:7: field "case_id": expected a string or an integer, got boolean true'
    ]
    assert record_errors(rrome_record(case_id=1.5)) == [
        'x.jsonl:7: field "case_id": expected a string or an integer, got number 1.5'
    ]
    assert record_errors(rrome_record(paraphrase="typo")) == [
        'x.jsonl:7: field "paraphrase": unknown field; rrome\'s records have "case_id", "prompt", "subject", '
        '"target_new", "target_true", "paraphrase_prompts", "neighborhood_prompts", "neighborhood_target"'
    ]
    assert record_errors(zsre_record(answers="uniform")) == [
        'x.jsonl:7: field "answers": expected an array of strings, got string'
    ]


def test_every_problem_of_a_record_is_listed() -> None:
    assert record_errors(rome_record(prompt="no placeholder", subject="", target_new={"id": "Q1"})) == [
        'x.jsonl:7: field "requested_rewrite.prompt": has no "{}" placeholder for the subject: "no placeholder" '
        '(write the relation as a template, e.g. "The mother tongue of {} is")',
        'x.jsonl:7: field "requested_rewrite.subject": empty string',
        'x.jsonl:7: field "requested_rewrite.target_new.str": missing',
    ]
    assert record_errors({"case_id": 1, "requested_rewrite": "x"}) == [
        'x.jsonl:7: field "requested_rewrite": expected an object, got string'
    ]
    assert record_errors(rome_record(target_true=7)) == [
        'x.jsonl:7: field "requested_rewrite.target_true": expected an object {"str": ...} or a string, got number 7'
    ]


def test_placeholder_count(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.jsonl",
        jsonl(
            rrome_record(prompt="The mother tongue of Danielle Darrieux is", target_true=..., neighborhood_prompts=[]),
            rrome_record(prompt="{} and {} speak"),
        ),
    )
    assert error_lines(path) == [
        f'{path}:1: field "prompt": has no "{{}}" placeholder for the subject: '
        '"The mother tongue of Danielle Darrieux is" (write the relation as a template, '
        'e.g. "The mother tongue of {} is")',
        f'{path}:2: field "prompt": has 2 "{{}}" placeholders; exactly one is allowed (where the subject goes)',
    ]


def test_subject_must_occur_in_filled_prompts(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.jsonl",
        jsonl(
            flat_record(subject="Toko yasuda"),
            zsre_record(subject="Unifirst"),
            flat_record(prompt="{} Toko Yasuda, the", case_id=3),
            {"prompt": "plays the", "subject": "Toko Yasuda", "target_new": "piano"},
        ),
    )
    assert error_lines(path) == [
        f'{path}:1: field "subject": "Toko yasuda" does not occur in field "prompt": "Toko Yasuda, the"',
        f'{path}:2: field "subject": "Unifirst" does not occur in field "src": "What is the product made by UniFirst?"',
        f'{path}:3: field "prompt": contains a literal "{{}}"; in this shape the subject is already filled in',
        f'{path}:4: field "prompt": has no "{{}}" placeholder for the subject: "plays the" '
        '(write the relation as a template, e.g. "The mother tongue of {} is")',
    ]


def test_target_new_equal_to_target_true(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "e.jsonl",
        jsonl(
            rrome_record(target_new="French"),
            rome_record(target_new={"str": "French"}),
            {**rome_record(target_new=" French", target_true="French"), "case_id": "r1"},
            flat_record(target_new="guitar"),
            zsre_record(alt="uniform "),
        ),
    )
    assert error_lines(path) == [
        f'{path}:1: field "target_new": equals "target_true" ("French"): the edit would change nothing',
        f'{path}:2: field "requested_rewrite.target_new.str": equals "requested_rewrite.target_true.str" '
        '("French"): the edit would change nothing',
        f'{path}:3: field "requested_rewrite.target_new": equals "requested_rewrite.target_true" '
        '(" French"): the edit would change nothing',
        f'{path}:4: field "target_new": equals "ground_truth" ("guitar"): the edit would change nothing',
        f'{path}:5: field "alt": equals the true answer "answers[0]" ("uniform"): the edit would change nothing',
    ]


def test_duplicate_case_ids(tmp_path: Path) -> None:
    lines = jsonl(flat_record(case_id=1), flat_record(case_id=2), rrome_record(case_id="1"))
    path = write(tmp_path, "e.jsonl", lines + "\n" + jsonl(rome_record()) + jsonl(flat_record(case_id=2)))
    assert error_lines(path) == [
        f'{path}:3: field "case_id": duplicate case_id "1", also at line 1',
        f'{path}:6: field "case_id": duplicate case_id "2", also at line 2',
    ]
    array = write(tmp_path, "e.json", json.dumps([rome_record(), flat_record(case_id=9), rome_record()]))
    assert error_lines(array) == [f'{array}: record 3: field "case_id": duplicate case_id "0", also at record 1']


def test_duplicate_json_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "e.jsonl", '{"prompt": "{} is", "subject": "a", "subject": "b", "target_new": "c"}\n')
    assert error_lines(path) == [
        f'{path}:1: field "subject": appears more than once in the object (JSON keeps only the last)'
    ]


def test_non_utf8(tmp_path: Path) -> None:
    good = jsonl(rrome_record()).encode()
    bad = b'{"prompt": "{} is", "subject": "Caf\xe9", "target_new": "x"}\n'
    path = write(tmp_path, "e.jsonl", good + bad + good.replace(b"French", b"German") + bad)
    assert error_lines(path) == [
        f"{path}:2: not valid UTF-8: byte 0xe9 at byte column 36",
        f"{path}:4: not valid UTF-8: byte 0xe9 at byte column 36",
    ]
    array = write(tmp_path, "e.json", b"[\n" + good.rstrip() + b",\n" + bad.rstrip() + b"\n]\n")
    assert error_lines(array) == [f"{array}:3: not valid UTF-8: byte 0xe9 at byte column 36"]


def test_empty_files(tmp_path: Path) -> None:
    for name, content in [("a.jsonl", ""), ("b.jsonl", "\n  \n\n"), ("c.json", " [ ]\n")]:
        path = write(tmp_path, name, content)
        (line,) = error_lines(path)
        assert line.startswith(f"{path}:1: empty ")
        assert line.endswith(": no edit requests")
        with pytest.raises(EditFileError):
            load_requests(path, skip_invalid=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_requests(tmp_path / "nope.jsonl")
    assert info.value.filename == str(tmp_path / "nope.jsonl")
    assert not isinstance(info.value, RromeError)


def test_all_errors_collected_up_to_twenty(tmp_path: Path) -> None:
    records = [rrome_record(case_id=i, subject="" if i % 2 else "s") for i in range(50)]
    path = write(tmp_path, "e.jsonl", jsonl(*records))
    lines = error_lines(path)
    assert len(lines) == 21
    assert lines[:2] == [f'{path}:2: field "subject": empty string', f'{path}:4: field "subject": empty string']
    assert lines[19] == f'{path}:40: field "subject": empty string'
    assert lines[20] == "... and 5 more"


def test_jsonl_blank_lines_bom_and_crlf(tmp_path: Path) -> None:
    body = "\r\n\r\n".join(json.dumps(r) for r in (rrome_record(case_id=1), flat_record())) + "\r\n"
    path = write(tmp_path, "e.jsonl", b"\xef\xbb\xbf" + body.encode())
    requests = load_requests(path)
    assert [r.case_id for r in requests] == ["1", "2"]
    assert requests[1].prompt == "{}, the"


def test_skip_invalid(tmp_path: Path) -> None:
    content = (
        jsonl(rrome_record(case_id=1), rrome_record(case_id=2, subject=""))
        + "{oops\n"
        + jsonl(rrome_record(case_id=1, target_new="German"), rrome_record(case_id=3, target_new="German"))
    )
    path = write(tmp_path, "e.jsonl", content)
    requests, skipped = load_requests(path, skip_invalid=True)
    assert [r.case_id for r in requests] == ["1", "3"]
    assert skipped == [
        (f"{path}:2", 'field "subject": empty string'),
        (f"{path}:3", "malformed JSON: Expecting property name enclosed in double quotes (column 2)"),
        (f"{path}:4", 'field "case_id": duplicate case_id "1", also at line 1'),
    ]
    several = write(tmp_path, "f.jsonl", jsonl(rrome_record(subject="", target_new=3)))
    assert load_requests(several, skip_invalid=True) == (
        [],
        [(f"{several}:1", 'field "subject": empty string; field "target_new": expected a string, got number 3')],
    )
    with pytest.raises(EditFileError):
        load_requests(path, skip_invalid=False)


# --------------------------------------------------------------------------------------------
# writing


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    requests = [
        DARRIEUX,
        EditRequest("{} plays the", "Toko Yasuda", "piano"),
        parse_record(flat_record(), where="w"),
        parse_record(zsre_record(alt=" Dickens"), where="w"),
        EditRequest("Le café de {} est {a}", "Peñoles", "日本", case_id="x"),
        EditRequest("{} is", "lone \ud800 surrogate", "y"),
    ]
    path = tmp_path / "out.jsonl"
    dump_requests(path, requests)
    assert load_requests(path) == requests
    assert load_requests(str(path)) == requests
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == len(requests) and "日本" in text
    assert json.loads(text.splitlines()[0]) == DARRIEUX.to_json()
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]

    # Overwrites atomically; a refused batch leaves the old file as it was.
    dump_requests(path, requests[:1])
    assert load_requests(path) == requests[:1]
    before = path.read_bytes()
    with pytest.raises(EditFileError, match=r'out\.jsonl:2: field "case_id": duplicate case_id "0", also at line 1$'):
        dump_requests(path, [DARRIEUX, DARRIEUX])
    with pytest.raises(EditFileError, match="no edit requests to write"):
        dump_requests(path, [])
    with pytest.raises(TypeError, match="EditRequest"):
        dump_requests(path, [DARRIEUX.to_json()])  # type: ignore[list-item]
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]


def test_dump_counterfact_round_trip(tmp_path: Path) -> None:
    requests = load_requests(COUNTERFACT_VAL)[:200]
    path = tmp_path / "cf.jsonl"
    dump_requests(path, requests)
    assert load_requests(path) == requests


def test_dump_into_missing_folder_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        dump_requests(tmp_path / "no" / "out.jsonl", [DARRIEUX])
    assert os.listdir(tmp_path) == []
