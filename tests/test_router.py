"""mta.delivery.connectors: connector choice by address space and cost, and the outbound source address."""
from __future__ import annotations

from mta.config import AddressSpace, Config, Connector, GatewayConfig, ListenAddress, VirtualServer
from mta.delivery.connectors import connectors_for, source_address, usable_source


def config(*connectors: Connector, listen: tuple[str, ...] = ("127.0.0.1",)) -> Config:
    vss = tuple(VirtualServer(f"vs{i}", (ListenAddress(host, 25),)) for i, host in enumerate(listen))
    return Config(GatewayConfig("gw.test", "/tmp/spool", "postmaster@gw.test"), vss, connectors)


def conn(name: str, *spaces: tuple[str, int], bridgeheads: tuple[str, ...] = ()) -> Connector:
    return Connector(name, tuple(AddressSpace(d, c) for d, c in spaces), bridgeheads=bridgeheads)


def names(connectors: list[Connector]) -> list[str]:
    return [c.name for c in connectors]


def test_exact_beats_wildcard_beats_star():
    cfg = config(conn("star", ("*", 1)), conn("sub", ("*.example.test", 5)), conn("exact", ("example.test", 9)))
    assert names(connectors_for(cfg, "example.test")) == ["exact", "sub", "star"]
    assert names(connectors_for(cfg, "mail.example.test")) == ["sub", "star"]
    assert names(connectors_for(cfg, "other.test")) == ["star"]


def test_longer_wildcard_is_more_specific():
    cfg = config(conn("broad", ("*.test", 1)), conn("narrow", ("*.corp.test", 10)))
    assert names(connectors_for(cfg, "a.corp.test")) == ["narrow", "broad"]
    assert names(connectors_for(cfg, "corp.test")) == ["narrow", "broad"]   # *.corp.test covers corp.test


def test_cost_orders_equal_spaces_and_config_order_breaks_ties():
    cfg = config(conn("dear", ("*", 5)), conn("cheap", ("*", 1)), conn("also-dear", ("*", 5)))
    assert names(connectors_for(cfg, "x.test")) == ["cheap", "dear", "also-dear"]


def test_connector_listed_once_at_its_best_space():
    cfg = config(conn("multi", ("*", 1), ("example.test", 3)), conn("exact", ("example.test", 1)))
    assert names(connectors_for(cfg, "example.test")) == ["exact", "multi"]
    assert names(connectors_for(cfg, "EXAMPLE.test.")) == ["exact", "multi"]
    assert names(connectors_for(cfg, "else.test")) == ["multi"]


def test_no_match():
    assert connectors_for(config(conn("corp", ("*.corp.test", 1))), "example.test") == []
    assert connectors_for(config(), "example.test") == []


def test_source_address_from_first_bridgehead():
    cfg = config(conn("c", ("*", 1), bridgeheads=("missing", "vs1", "vs0")),
                 conn("wild", ("*", 1), bridgeheads=("vs2",)), conn("none", ("*", 1)),
                 listen=("127.0.0.1", "127.0.0.9", "0.0.0.0"))
    assert source_address(cfg, cfg.connectors[0]) == "127.0.0.9"
    assert source_address(cfg, cfg.connectors[1]) is None
    assert source_address(cfg, cfg.connectors[2]) is None


def test_usable_source():
    assert usable_source("127.0.0.9", "127.0.0.41") == "127.0.0.9"
    assert usable_source("127.0.0.9", "192.0.2.1") is None         # loopback cannot reach out
    assert usable_source("192.0.2.7", "2001:db8::1") is None       # family mismatch
    assert usable_source("192.0.2.7", "192.0.2.1") == "192.0.2.7"
    assert usable_source("127.0.0.9", "mx.example.test") is None
    assert usable_source(None, "127.0.0.41") is None
