"""A rules file the sidecar refuses, the mock refuses too, with the sidecar's message: a
developer testing against the mock must not find out in production that the file is wrong."""
from __future__ import annotations

import subprocess

import pytest

from conftest import ENV, binary
from coresdk import Settings
from coresdk.mock import MockSidecar, RulesError

FLAGS = '[flags]\npro_features = false\nadvanced_analytics = false\n'


def rule(body: str) -> str:
    return f"[[rule]]\n{body}\n"


REFUSED = [
    (
        rule('events = ["customer.subscription.updated"]\nstatus = ["actve"]\nset = { pro_features = true }'),
        "rule 1 names status 'actve', which is not one of Stripe's subscription statuses",
    ),
    (
        rule('name = "paid"\nevents = ["invoice.paid"]\nstatus = ["active"]\nset = { pro_features = true }'),
        "rule 1 ('paid') has a `status` condition but lists 'invoice.paid': only customer.subscription.* events carry a subscription status",
    ),
    (
        rule('events = ["customer.subscription.updated"]\nset = { advanced_analytics = true }\nelse = { advanced_analytics = false }'),
        "rule 1 has an `else`, which only a `set` rule with `plans` can have",
    ),
    (
        rule('name = "same"\nevents = ["invoice.paid"]\nset = { pro_features = true }')
        + rule('name = "same"\nevents = ["invoice.payment_failed"]\nset = { pro_features = false }'),
        "two rules are named 'same'; `flags explain` tells rules apart by name",
    ),
    (
        rule('events = ["customer.subscription.updated"]\nstatus = []\nset = { pro_features = true }'),
        "rule 1 has an empty `status` list, which no event matches",
    ),
    (
        rule('events = ["invoice.paid"]\nset = { no_such_flag = true }'),
        "rule 1 sets flag 'no_such_flag', which [flags] does not define",
    ),
    (
        rule('events = ["customer.subscription.updated"]\nplans = ["pro monthly"]\nset = { advanced_analytics = true }'),
        "rule 1 lists plan 'pro monthly', which can never match",
    ),
    (rule('events = ["invoice.paid"]\nbogus = 1\nset = { pro_features = true }'), "`bogus`"),
    ('[flag]\npro_features = false\n', "`flag`"),
]


@pytest.mark.parametrize("rules, message", REFUSED)
def test_a_rules_file_the_sidecar_refuses_the_mock_refuses(tmp_path, rules, message):
    path = tmp_path / "rules.toml"
    path.write_text(FLAGS + rules if not rules.startswith("[flag]") else rules)
    sidecar = subprocess.run(
        [str(binary()), "serve", "--store", "memory", "--listen", "127.0.0.1:0", "--rules-file", str(path)],
        env={"PATH": "", "CORESDK_LOG": "error"}, capture_output=True, text=True, timeout=30,
    )
    assert sidecar.returncode == 2 and message in sidecar.stderr, sidecar.stderr
    with pytest.raises(RulesError) as caught:
        MockSidecar(Settings(use_mock=True), env={**ENV, "CORESDK_RULES_FILE": str(path)})
    assert message in str(caught.value)


def test_the_default_rules_load_in_the_mock():
    MockSidecar(Settings(use_mock=True), env=ENV)
