"""Interaction-log readers on the embedded data, on ../shared datasets when present, and on small synthetic logs."""
from __future__ import annotations

import numpy as np
import pytest

from trainer import data
from conftest import shared_dataset


def seq_ids(d, u):
    return [d.item_ids[t - 1] for t in d.sequences[u]]


def test_embedded_beauty_matches_source_stats():
    d = data.load(None)
    assert (d.num_users, d.num_items, d.num_interactions) == (22363, 12101, 198502)
    assert d.source["format"] == "sequence" and d.events is None
    # line 1 of Beauty.txt is "1 1 2 3 4 5"
    assert d.user_ids[0] == "1" and seq_ids(d, 0) == ["1", "2", "3", "4", "5"]
    assert d.item_attributes is not None and len(d.item_attributes) == 12101
    # "4": [1, 2, 3] in Beauty_item2attributes.json
    assert d.item_attributes[d.item_ids.index("4")] == ["1", "2", "3"]
    assert d.source["fingerprint"].startswith("sha256:")


def test_taobao_head_headerless_with_events_and_categories():
    d = data.load(shared_dataset("taobao_userbehavior_head", "UserBehavior_head84476.csv"))
    assert d.num_users == 815 and d.num_items == 55368
    assert d.source["dropped_no_time"] == 1          # the truncated last line has no timestamp
    assert d.source["columns"] == {"user": ["0"], "item": ["1"], "category": ["2"], "event": ["3"], "time": ["4"]}
    codes = np.concatenate(d.events)
    # pv 75,872 / cart 4,497 + fav 2,356 / buy 1,750, minus collapsed consecutive repeats
    assert codes.max() == 2 and (codes == 2).sum() > 1500 and (codes == 1).sum() > 5000
    assert d.item_ids[0] == "2268318" and d.item_attributes[0] == ["2520377"]


def test_diginetica_uses_sessions_and_date_then_offset():
    d = data.load(shared_dataset("diginetica_sample_srgnn", "sample_train-item-views.csv"))
    assert d.num_users == 2986 and d.num_items == 7139
    assert d.source["columns"]["user"] == ["session_id"]
    assert d.source["columns"]["time"] == ["eventdate", "timeframe"]
    assert d.num_interactions + d.source["collapsed_repeats"] == 12391


def test_bert4rec_pairs():
    d = data.load(shared_dataset("amazon_beauty_bert4rec", "beauty.txt"))
    assert (d.num_users, d.num_items, d.num_interactions) == (40226, 54542, 353962)
    assert d.source["format"] == "pairs"


def test_csv_with_header_sorts_by_time_maps_events(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user_id,product_id,event_time,event_type,category_id\n"
                 "a,10,2020-01-01 00:00:03 UTC,purchase,c1\n"
                 "a,11,2020-01-01 00:00:01 UTC,view,c2\n"
                 "b,10,2020-01-01 00:00:00 UTC,addtocart,c1\n"
                 "a,12,2020-01-01 00:00:02 UTC,remove_from_cart,c1\n"
                 "a,11,2020-01-01 00:00:02 UTC,cart,c2\n")
    d = data.load(p)
    assert d.user_ids == ["a", "b"]
    # a: 11 (view) then 11 (cart, collapsed into one, strongest kept) then 10 (purchase); 12 dropped
    assert seq_ids(d, 0) == ["11", "10"]
    assert [data.EVENT_TYPES[c] for c in d.events[0]] == ["cart", "purchase"]
    assert seq_ids(d, 1) == ["10"] and d.events[1].tolist() == [1]
    assert d.source["dropped_events"] == 1 and d.source["collapsed_repeats"] == 1
    assert d.item_attributes[d.item_ids.index("11")] == ["c2"]


def test_tsv_headerless_three_columns(tmp_path):
    p = tmp_path / "log.tsv"
    p.write_text("1\t5\t1600000003\n1\t6\t1600000001\n2\t5\t1600000002\n")
    d = data.load(p)
    assert seq_ids(d, 0) == ["6", "5"] and seq_ids(d, 1) == ["5"] and d.events is None


def test_explicit_columns(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("x,y,z\nu1,i1,3\nu1,i2,1\n")
    d = data.load(p, columns="user=x,item=y,time=z")
    assert seq_ids(d, 0) == ["i2", "i1"]
    q = tmp_path / "nohdr.csv"
    q.write_text("9,u1,i1\n1,u1,i2\n")
    d = data.load(q, columns="time,user,item")
    assert seq_ids(d, 0) == ["i2", "i1"]


@pytest.mark.parametrize("content, columns, words", [
    ("user_id,item_id,ts\nu,i,yesterday\nu,j,1\n", None, "neither a number nor a date"),
    ("a,b\nu,i\n", "user=a,item=c", "column 'c'"),
    ("1,2,3\n", "user,item", "names 2 roles but the file has 3 columns"),
    ("1,2,3\n", "user,item,colour", "unknown role 'colour'"),
    ("", None, "empty"),
])
def test_bad_logs_raise_clear_errors(tmp_path, content, columns, words):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(data.DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        data.load(p, columns=columns)


def test_missing_file():
    with pytest.raises(data.DataError, match="no such file"):
        data.load("/nonexistent/log.csv")
