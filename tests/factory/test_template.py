"""The prompt-template grammar: parse (columns, bounds), render (weights, picks, nesting, escapes), count."""
from __future__ import annotations

from collections import Counter

import pytest

from factory.errors import CampaignError
from factory.template import COMBINATIONS_CAP, Ref, Variant, count_combinations, parse_template, render
from tests.factory.campaign_texts import ISSUE_YAML, binomial_ok, campaign_with, write
from factory.campaign_file import load_campaign


class _FirstChoice:
    """Always the first option of positive weight: makes `render` deterministic to read."""

    def pick(self, weights) -> int:
        return next(i for i, w in enumerate(weights) if w > 0)

    def pick_cumulative(self, cum) -> int:
        return 0


def test_parse_render_and_count_without_a_campaign():
    t = parse_template("3::a {0::x|big|small} __colour__ {2$$p|q|r}", "f.yaml", 4, "jobs/j")
    assert (t.weight, t.text, t.file, t.line) == (3.0, "a {0::x|big|small} __colour__ {2$$p|q|r}", "f.yaml", 4)
    assert isinstance(t.parts[1], Variant) and t.parts[3] == Ref("colour") and t.parts[5].pick == (2, 2)
    lists = {"colour": (parse_template("red"), parse_template("{light|dark} blue"))}
    entries_of = lambda path: (lists[path], [1.0, 2.0])  # noqa: E731
    choices: dict = {}
    text = render(t.parts, _FirstChoice(), entries_of, choices, [0])
    assert text == "a big red p, q"
    assert choices == {"{0::x|big|small}": "big", "colour": "red", "{2$$p|q|r}": "p, q"}
    # 2 sizes (the zero weight never drawn) x (1 + 2) colours x 3*2 ordered picks of 2 from 3
    assert count_combinations(t.parts, entries_of, {}) == 2 * 3 * 6
    many = parse_template(" ".join(["{a|b|c|d|e|f|g|h|i|j}"] * 40))
    assert count_combinations(many.parts, entries_of, {}) == COMBINATIONS_CAP


def test_parse_template_reports_column():
    with pytest.raises(CampaignError, match="column 3"):
        parse_template("a {b|c", "f.yaml", 3, "x")


@pytest.mark.parametrize("text", ["a" + " " * 100_000 + "b", "{" + " " * 100_000 + "a}", "{2" + " " * 100_000 + "$$a|b}",
                                  "__" + "a_" * 50_000, "x:" * 50_000 + ":y"])
def test_pathological_strings_parse_in_linear_time(text):
    """Regexes that backtrack would take minutes on these; bounded here by pytest's timeout only."""
    try:
        parse_template(text, "f.yaml", 1, "x")
    except CampaignError:
        pass


def test_brace_weights_within_binomial_tolerance(tmp_path):
    c = load_campaign(write(tmp_path, ISSUE_YAML))
    n = 3000
    grey = violet = 0
    for i in range(n):
        ch = c.draw("eyes", i).choices
        v = ch.get("{3::grey|violet}")
        grey += v == "grey"
        violet += v == "violet"
    k = grey + violet  # samples that drew the weighted entry: 1/4 of eyes/color's entries
    assert binomial_ok(k, n, 0.25)
    assert binomial_ok(grey, k, 0.75), (grey, violet)


def test_nesting_references_inside_choices_and_globs(tmp_path):
    c = campaign_with(tmp_path, wildcards="""\
        color:
          warm: [red, orange]
          cool: [blue, "{light|dark} __color/warm__"]
        """, template="{a {big|small} __color/cool__|the __color/*__ one}", quota=400)
    prompts = {s.prompt for s in c.draws("j")}
    allowed = set()
    for size in ("big", "small"):
        for cool in ["blue"] + [f"{s} {w}" for s in ("light", "dark") for w in ("red", "orange")]:
            allowed.add(f"a {size} {cool}")
    for any_ in ["red", "orange", "blue"] + [f"{s} {w}" for s in ("light", "dark") for w in ("red", "orange")]:
        allowed.add(f"the {any_} one")
    assert prompts <= allowed and len(prompts) > 10
    # arithmetic count: a {2} x cool(1 + 2*2) = 10, plus glob over warm(2) + cool(5) = 7
    assert c.combinations("j") == 17


def test_pick_several_distinct_options(tmp_path):
    c = campaign_with(tmp_path, wildcards="c: [red, blue, '{light|dark} green']\n",
                      template="{2$$__c__|gold|silver} / {1-3$$ and $$x|y|z} / {-2$$p|q}", quota=300)
    sizes = Counter()
    for smp in c.draws("j"):
        two, many, upto = smp.prompt.split(" / ")
        parts = two.split(", ")
        assert len(parts) == 2 and len(set(parts)) == 2
        assert set(parts) <= {"red", "blue", "light green", "dark green", "gold", "silver"}
        picked = many.split(" and ")
        assert 1 <= len(picked) <= 3 and len(set(picked)) == len(picked) and set(picked) <= {"x", "y", "z"}
        sizes[len(picked)] += 1
        assert 1 <= len(upto.split(", ")) <= 2
    assert set(sizes) == {1, 2, 3}
    # ordered picks: 2! * e2(4, 1, 1) = 18; sum over k of k! * e_k(1, 1, 1) = 3 + 6 + 6 = 15; 2 + 2 = 4
    assert c.combinations("j") == 18 * 15 * 4


def test_pick_more_than_available_is_an_error(tmp_path):
    with pytest.raises(CampaignError, match="asks for 3 of 2 options"):
        campaign_with(tmp_path, template="{3$$a|b}")


def test_escapes_and_literal_underscores(tmp_path):
    c = campaign_with(tmp_path, template=r"a \{literal\} \| pipe, snake_case and __ alone")
    assert c.draw("j", 0).prompt == "a {literal} | pipe, snake_case and __ alone"


def test_choices_record_every_site(tmp_path):
    c = campaign_with(tmp_path, wildcards="w: [x]\n", template="__w__ __w__ {p|q}")
    ch = c.draw("j", 0).choices
    assert ch["w"] == "x" and ch["w#2"] == "x" and ch["{p|q}"] in {"p", "q"}


def test_astronomical_combinations_are_sampled_not_enumerated(tmp_path):
    lists = "".join(f"w{i}: [" + ", ".join(f"'{{a|b|c}} v{k}'" for k in range(30)) + "]\n" for i in range(40))
    template = " ".join(f"__w{i}__" for i in range(40))
    c = campaign_with(tmp_path, wildcards=lists, template=template, quota=5)
    assert c.combinations("j") >= 10**30  # 90**40, saturated
    prompts = [s.prompt for s in c.draws("j")]
    assert len(prompts) == 5 and all(len(p.split()) == 80 for p in prompts)
