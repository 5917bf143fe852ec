"""Port mapping: codecs against bytes laid out by hand from the RFCs, the UPnP parsers against a
description written for this test, and the PortMapper state machine on a fake clock."""

from __future__ import annotations

import contextlib
import random
from xml.etree import ElementTree

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.portmap import (
    HttpRequest,
    HttpResponse,
    IgdService,
    MappingAcquired,
    MappingFailed,
    MappingLost,
    MappingRenewed,
    Method,
    Outcome,
    Phase,
    PortMapError,
    PortMapper,
    UpnpFault,
    add_port_mapping,
    behind_another_nat,
    encode_natpmp_address_request,
    encode_natpmp_map,
    encode_pcp_map,
    encode_ssdp_search,
    epoch_valid,
    parse_device_description,
    parse_http_response,
    parse_natpmp_response,
    parse_pcp_response,
    parse_soap_response,
    parse_ssdp_response,
    parse_url,
)

GATEWAY = "192.168.1.1"
BOX = "192.168.1.10"
PUBLIC = "203.0.113.7"  # documentation prefix standing in for the router's public address
PORT = 41641  # 0xA2A9
NONCE = bytes(range(1, 13))
LOCATION = "http://192.168.1.1:5000/rootDesc.xml"

# --- bytes laid out by hand ---------------------------------------------------------------------

V4MAPPED = bytes(10) + b"\xff\xff"


def pcp_map_response(
    *,
    result: int = 0,
    lifetime: int = 7200,
    epoch: int = 1000,
    nonce: bytes = NONCE,
    internal_port: int = PORT,
    external_port: int = PORT,
    external_ip: bytes = bytes([203, 0, 113, 7]),
) -> bytes:
    # RFC 6887 §7.2 + §11.1: version 2, R|opcode, reserved, result, lifetime, epoch, 12 reserved,
    # nonce, protocol 17, 3 reserved, internal port, external port, external address.
    return (
        bytes([2, 0x81, 0, result])
        + lifetime.to_bytes(4, "big")
        + epoch.to_bytes(4, "big")
        + bytes(12)
        + nonce
        + bytes([17, 0, 0, 0])
        + internal_port.to_bytes(2, "big")
        + external_port.to_bytes(2, "big")
        + V4MAPPED
        + external_ip
    )


def pcp_announce(epoch: int) -> bytes:
    return bytes([2, 0x80, 0, 0]) + bytes(4) + epoch.to_bytes(4, "big") + bytes(12)


def natpmp_address_response(
    ip: bytes = bytes([203, 0, 113, 7]), result: int = 0, epoch: int = 50
) -> bytes:
    return bytes([0, 128]) + result.to_bytes(2, "big") + epoch.to_bytes(4, "big") + ip


def natpmp_map_response(
    *,
    result: int = 0,
    epoch: int = 51,
    internal: int = PORT,
    external: int = PORT,
    lifetime: int = 7200,
) -> bytes:
    return (
        bytes([0, 129])
        + result.to_bytes(2, "big")
        + epoch.to_bytes(4, "big")
        + internal.to_bytes(2, "big")
        + external.to_bytes(2, "big")
        + lifetime.to_bytes(4, "big")
    )


def test_pcp_map_request_golden_bytes() -> None:
    expected = bytes.fromhex(
        "02"  # version 2
        "01"  # R = 0, opcode MAP
        "0000"  # reserved
        "00001c20"  # requested lifetime 7200
        "00000000000000000000ffffc0a8010a"  # client 192.168.1.10, IPv4-mapped
        "0102030405060708090a0b0c"  # nonce
        "11"  # protocol UDP
        "000000"  # reserved
        "a2a9"  # internal port 41641
        "a2a9"  # suggested external port 41641
        "00000000000000000000ffff00000000"  # suggested external ::ffff:0.0.0.0 (any)
    )
    request = encode_pcp_map(
        client_ip=BOX, nonce=NONCE, internal_port=PORT, lifetime=7200, external_port=PORT
    )
    assert request == expected
    assert len(request) == 60


def test_pcp_delete_is_lifetime_zero() -> None:
    request = encode_pcp_map(
        client_ip=BOX,
        nonce=NONCE,
        internal_port=PORT,
        lifetime=0,
        external_port=PORT,
        external_ip=PUBLIC,
    )
    assert request[4:8] == b"\x00\x00\x00\x00"
    assert request[-4:] == bytes([203, 0, 113, 7])


def test_pcp_rejects_a_short_nonce() -> None:
    with pytest.raises(PortMapError):
        encode_pcp_map(client_ip=BOX, nonce=b"short", internal_port=PORT, lifetime=1)


def test_natpmp_requests_golden_bytes() -> None:
    assert encode_natpmp_address_request() == b"\x00\x00"
    # version 0, opcode 1 (UDP), reserved, internal port, suggested external port, lifetime
    assert encode_natpmp_map(
        internal_port=PORT, external_port=PORT, lifetime=7200
    ) == bytes.fromhex("00010000a2a9a2a900001c20")
    # RFC 6886 §3.4: delete = lifetime 0 and external port 0
    assert encode_natpmp_map(internal_port=PORT, external_port=0, lifetime=0) == bytes.fromhex(
        "00010000a2a9000000000000"
    )


def test_parse_pcp_map_success() -> None:
    r = parse_pcp_response(pcp_map_response(external_port=50000, lifetime=3600, epoch=77))
    assert (r.opcode, r.result, r.lifetime, r.epoch) == (1, 0, 3600, 77)
    assert (r.nonce, r.protocol, r.internal_port, r.external_port) == (NONCE, 17, PORT, 50000)
    assert r.external_ip == PUBLIC
    assert r.meaning == "success"


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (2, "refuses port mappings"),
        (7, "network failure"),
        (8, "out of mappings"),
        (12, "another address"),
        (99, "unknown PCP result code 99"),
    ],
)
def test_pcp_result_codes_have_human_meanings(code: int, words: str) -> None:
    r = parse_pcp_response(pcp_map_response(result=code))
    assert r.result == code
    assert words in r.meaning


def test_parse_pcp_announce_and_options() -> None:
    r = parse_pcp_response(pcp_announce(epoch=5))
    assert (r.opcode, r.epoch, r.nonce) == (0, 5, b"")
    # A MAP response with an option after it (4-byte option header + 4 bytes) still parses.
    with_option = pcp_map_response() + bytes([0x80, 0, 0, 4]) + bytes(4)
    assert parse_pcp_response(with_option).external_port == PORT


@pytest.mark.parametrize(
    "data",
    [
        b"",
        pcp_map_response()[:23],
        pcp_map_response()[:40],  # MAP body cut short
        pcp_map_response() + b"\x00",  # not a multiple of 4
        bytes([1]) + pcp_map_response()[1:],  # version 1
        bytes([2, 0x01]) + pcp_map_response()[2:],  # a request (R = 0)
        bytes([2, 0x83]) + pcp_map_response()[2:],  # opcode 3
        pcp_map_response() + bytes(1100),  # longer than 1100 bytes
    ],
)
def test_parse_pcp_rejects(data: bytes) -> None:
    with pytest.raises(PortMapError):
        parse_pcp_response(data)


def test_parse_natpmp_responses() -> None:
    a = parse_natpmp_response(natpmp_address_response(epoch=9))
    assert (a.opcode, a.result, a.epoch, a.external_ip) == (0, 0, 9, PUBLIC)
    m = parse_natpmp_response(natpmp_map_response(external=50001, lifetime=3600))
    assert (m.opcode, m.internal_port, m.external_port, m.lifetime) == (1, PORT, 50001, 3600)
    # An error response may stop after the epoch (RFC 6886 §3.5).
    e = parse_natpmp_response(bytes([0, 129, 0, 2]) + (3).to_bytes(4, "big"))
    assert (e.opcode, e.result) == (1, 2)
    assert "turned off" in e.meaning


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x80\x00",  # short
        natpmp_address_response()[:11],
        natpmp_map_response()[:15],
        bytes([1]) + natpmp_address_response()[1:],  # version 1
        bytes([0, 1]) + natpmp_address_response()[2:],  # a request
        bytes([0, 200]) + natpmp_address_response()[2:],  # unknown opcode
    ],
)
def test_parse_natpmp_rejects(data: bytes) -> None:
    with pytest.raises(PortMapError):
        parse_natpmp_response(data)


def test_epoch_validity() -> None:
    assert epoch_valid(1000, 10.0, 1100, 110.0)  # both advanced 100 s
    assert epoch_valid(1000, 10.0, 1101, 110.0)  # within 2 s
    assert not epoch_valid(1000, 10.0, 5, 110.0)  # server restarted
    assert not epoch_valid(1000, 10.0, 1010, 110.0)  # server clock far behind ours
    assert not epoch_valid(1000, 10.0, 1500, 110.0)  # server clock far ahead


# --- SSDP ---------------------------------------------------------------------------------------


def test_ssdp_search_text() -> None:
    assert encode_ssdp_search("urn:schemas-upnp-org:device:InternetGatewayDevice:1") == (
        b"M-SEARCH * HTTP/1.1\r\n"
        b"HOST: 239.255.255.250:1900\r\n"
        b'MAN: "ssdp:discover"\r\n'
        b"MX: 2\r\n"
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"\r\n"
    )


SSDP_ANSWER = (
    b"HTTP/1.1 200 OK\r\n"
    b"CACHE-CONTROL: max-age=120\r\n"
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
    b"USN: uuid:5d1e7a6c-0000-4000-8000-0123456789ab::urn:schemas-upnp-org:device:"
    b"InternetGatewayDevice:1\r\n"
    b"EXT:\r\n"
    b"SERVER: ExampleOS/2.0 UPnP/1.1 ExampleRouter/1.0\r\n"
    b"location: http://192.168.1.1:5000/rootDesc.xml\r\n"
    b'OPT: "http://schemas.upnp.org/upnp/1/0/"; ns=01\r\n'
    b"  folded junk line\r\n"
    b"\r\n"
)


def test_parse_ssdp_answer() -> None:
    answer = parse_ssdp_response(SSDP_ANSWER)
    assert answer.location == LOCATION
    assert answer.search_target.endswith("InternetGatewayDevice:1")
    assert answer.usn.startswith("uuid:5d1e7a6c")
    assert "ExampleRouter" in answer.server


@pytest.mark.parametrize(
    "data",
    [
        SSDP_ANSWER.replace(b"200 OK", b"404 Not Found"),
        SSDP_ANSWER.replace(b"location", b"x-location"),
        SSDP_ANSWER.replace(b"http://192.168.1.1:5000", b"https://192.168.1.1"),
        SSDP_ANSWER.replace(b"http://192.168.1.1:5000", b"http://router.lan:5000"),
        b"NOTIFY * HTTP/1.1\r\nLOCATION: http://192.168.1.1/\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nLOCATION: http://192.168.1.1/" + b"a" * 9000 + b"\r\n\r\n",
    ],
)
def test_parse_ssdp_rejects(data: bytes) -> None:
    with pytest.raises(PortMapError):
        parse_ssdp_response(data)


# --- device description -------------------------------------------------------------------------

# Written for this test in the shape of an IGD:1 router's rootDesc.xml: a PPP and an IP connection
# service on one WANConnectionDevice, other services around them, relative control URLs.
DESCRIPTION = b"""<?xml version="1.0" encoding="UTF-8"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
  <specVersion><major>1</major><minor>0</minor></specVersion>
  <device>
    <deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
    <friendlyName>Example Home Router</friendlyName>
    <manufacturer>Example Networks</manufacturer>
    <modelName>HR-1000</modelName>
    <UDN>uuid:5d1e7a6c-0000-4000-8000-0123456789ab</UDN>
    <serviceList>
      <service>
        <serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
        <serviceId>urn:upnp-org:serviceId:L3Forwarding1</serviceId>
        <SCPDURL>/L3F.xml</SCPDURL>
        <controlURL>/ctl/L3F</controlURL>
        <eventSubURL>/evt/L3F</eventSubURL>
      </service>
    </serviceList>
    <deviceList>
      <device>
        <deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
        <friendlyName>WAN</friendlyName>
        <serviceList>
          <service>
            <serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1</serviceType>
            <serviceId>urn:upnp-org:serviceId:WANCommonIFC1</serviceId>
            <SCPDURL>/WANCfg.xml</SCPDURL>
            <controlURL>/ctl/CmnIfCfg</controlURL>
            <eventSubURL>/evt/CmnIfCfg</eventSubURL>
          </service>
        </serviceList>
        <deviceList>
          <device>
            <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
            <friendlyName>WAN connection</friendlyName>
            <serviceList>
              <service>
                <serviceType>urn:schemas-upnp-org:service:WANPPPConnection:1</serviceType>
                <serviceId>urn:upnp-org:serviceId:WANPPPConn1</serviceId>
                <SCPDURL>/WANPPPCn.xml</SCPDURL>
                <controlURL>ctl/PPPConn</controlURL>
                <eventSubURL>/evt/PPPConn</eventSubURL>
              </service>
              <service>
                <serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
                <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
                <SCPDURL>/WANIPCn.xml</SCPDURL>
                <controlURL>/ctl/IPConn</controlURL>
                <eventSubURL>/evt/IPConn</eventSubURL>
              </service>
            </serviceList>
          </device>
        </deviceList>
      </device>
    </deviceList>
    <presentationURL>http://192.168.1.1/</presentationURL>
  </device>
</root>
"""


def test_description_finds_the_connection_services_ip_first() -> None:
    services = parse_device_description(DESCRIPTION, LOCATION)
    assert services == [
        IgdService(
            "urn:schemas-upnp-org:service:WANIPConnection:1",
            "http://192.168.1.1:5000/ctl/IPConn",
        ),
        IgdService(
            "urn:schemas-upnp-org:service:WANPPPConnection:1",
            "http://192.168.1.1:5000/ctl/PPPConn",
        ),
    ]
    assert services[0].version == 1


def test_description_honours_urlbase_and_prefers_igd2() -> None:
    doc = DESCRIPTION.replace(
        b"<specVersion>", b"<URLBase>http://192.168.1.1:49152/base/</URLBase><specVersion>"
    ).replace(b"WANIPConnection:1", b"WANIPConnection:2")
    services = parse_device_description(doc, LOCATION)
    assert services[0] == IgdService(
        "urn:schemas-upnp-org:service:WANIPConnection:2", "http://192.168.1.1:49152/ctl/IPConn"
    )
    assert services[1].control_url == "http://192.168.1.1:49152/base/ctl/PPPConn"


def test_description_drops_control_urls_on_other_hosts() -> None:
    doc = DESCRIPTION.replace(b"<controlURL>/ctl/IPConn", b"<controlURL>http://192.0.2.66/ctl")
    services = parse_device_description(doc, LOCATION)
    assert [s.service_type.rsplit(":", 2)[-2] for s in services] == ["WANPPPConnection"]


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE root [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
<root><device><serviceList><service><serviceType>&b;</serviceType></service></serviceList>
</device></root>"""


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (BILLION_LAUGHS, "DTD"),
        (
            DESCRIPTION.replace(b"<root", b'<!DOCTYPE root SYSTEM "http://192.0.2.1/x.dtd"><root'),
            "DTD",
        ),
        (
            DESCRIPTION.replace(b"WANIPConnection", b"X").replace(b"WANPPPConnection", b"Y"),
            "no WAN",
        ),
        (DESCRIPTION[:-20], "bad XML"),
        (DESCRIPTION.decode().encode("utf-16"), "not UTF-8"),
        (b"<html><body>router login</body></html>", "no <root>"),
        (DESCRIPTION + b"<!--" + b"x" * 140_000 + b"-->", "too large"),
    ],
)
def test_description_rejects(data: bytes, words: str) -> None:
    with pytest.raises(PortMapError, match=words):
        parse_device_description(data, LOCATION)


def test_description_ignores_declared_encodings() -> None:
    # From text, the declaration cannot make expat read the markup in another charset.
    doc = DESCRIPTION.replace(b'encoding="UTF-8"', b'encoding="cp037"')
    assert len(parse_device_description(doc, LOCATION)) == 2


# --- URLs and HTTP ------------------------------------------------------------------------------


def test_parse_url() -> None:
    url = parse_url("http://192.168.1.1:5000/ctl/IPConn?x=1")
    assert (url.host, url.port, url.target, url.host_header) == (
        "192.168.1.1",
        5000,
        "/ctl/IPConn?x=1",
        "192.168.1.1:5000",
    )
    assert parse_url("http://[fe80::1]/").host_header == "[fe80::1]:80"
    for bad in (
        "https://192.168.1.1/",
        "http://router/",
        "http://1.2.3.4:0/",
        "http://1.2.3.4:99999/",
        "http://1.2.3.4/a b",
        "ftp://1.2.3.4/",
        "http://[::1/",
        "http://1.2.3.4/é",
    ):
        with pytest.raises(PortMapError):
            parse_url(bad)


def test_http_content_length_and_completeness() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello"
    assert parse_http_response(raw[:-1], eof=False) is None
    with pytest.raises(PortMapError):
        parse_http_response(raw[:-1], eof=True)
    r = parse_http_response(raw + b"trailing junk", eof=False)
    assert r is not None and (r.status, r.reason, r.body, r.headers["server"]) == (
        200,
        "OK",
        b"hello",
        "x",
    )


def test_http_chunked_and_until_close() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    assert parse_http_response(raw[:-8], eof=False) is None
    r = parse_http_response(raw)
    assert r is not None and r.body == b"hello world"
    until_close = b"HTTP/1.0 200 OK\r\n\r\nbody"
    assert parse_http_response(until_close, eof=False) is None
    r = parse_http_response(until_close, eof=True)
    assert r is not None and r.body == b"body"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\n",  # no end of header
        b"SIP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n",  # latin-1 superscript digits
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
    ],
)
def test_http_rejects(raw: bytes) -> None:
    with pytest.raises(PortMapError):
        parse_http_response(raw, eof=True)


# --- SOAP ---------------------------------------------------------------------------------------

IP_CONN = IgdService(
    "urn:schemas-upnp-org:service:WANIPConnection:1", "http://192.168.1.1:5000/ctl/IPConn"
)


def soap_ok(action: str, inner: str = "") -> HttpResponse:
    body = (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action}Response xmlns:u="{IP_CONN.service_type}">{inner}</u:{action}Response>'
        "</s:Body></s:Envelope>"
    ).encode()
    return HttpResponse(200, "OK", {}, body)


def soap_fault(code: int, description: str) -> HttpResponse:
    body = (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><s:Fault>'
        "<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
        '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{description}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    ).encode()
    return HttpResponse(500, "Internal Server Error", {}, body)


def test_add_port_mapping_request() -> None:
    url, raw = add_port_mapping(
        IP_CONN,
        external_port=50000,
        internal_port=PORT,
        internal_client=BOX,
        lease=3600,
        description="lazycat <box> & co",
    )
    assert (url.host, url.port) == ("192.168.1.1", 5000)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /ctl/IPConn HTTP/1.1"
    assert "Host: 192.168.1.1:5000" in lines
    assert 'SOAPAction: "urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"' in lines
    assert f"Content-Length: {len(body)}" in lines
    envelope = ElementTree.fromstring(body)  # noqa: S314 - our own request
    action = envelope.find(
        "{http://schemas.xmlsoap.org/soap/envelope/}Body/"
        "{urn:schemas-upnp-org:service:WANIPConnection:1}AddPortMapping"
    )
    assert action is not None
    # The IGD spec fixes the argument order.
    assert [(c.tag, c.text) for c in action] == [
        ("NewRemoteHost", None),
        ("NewExternalPort", "50000"),
        ("NewProtocol", "UDP"),
        ("NewInternalPort", "41641"),
        ("NewInternalClient", BOX),
        ("NewEnabled", "1"),
        ("NewPortMappingDescription", "lazycat <box> & co"),
        ("NewLeaseDuration", "3600"),
    ]


def test_soap_success_and_faults() -> None:
    out = parse_soap_response(
        soap_ok("GetExternalIPAddress", f"<NewExternalIPAddress>{PUBLIC}</NewExternalIPAddress>"),
        "GetExternalIPAddress",
    )
    assert out == {"NewExternalIPAddress": PUBLIC}
    with pytest.raises(UpnpFault) as fault:
        parse_soap_response(soap_fault(718, "ConflictInMappingEntry"), "AddPortMapping")
    assert fault.value.code == 718
    assert "ConflictInMappingEntry" in str(fault.value)
    assert "already mapped" in str(fault.value)
    with pytest.raises(UpnpFault) as bare:
        parse_soap_response(HttpResponse(500, "Internal Server Error", {}, b""), "AddPortMapping")
    assert bare.value.code is None and "HTTP 500" in str(bare.value)
    with pytest.raises(PortMapError, match="no AddPortMappingResponse"):
        parse_soap_response(soap_ok("GetExternalIPAddress"), "AddPortMapping")
    # A fault sent with status 200 is still a fault.
    with pytest.raises(UpnpFault):
        r = soap_fault(606, "Action not authorized")
        parse_soap_response(HttpResponse(200, "OK", {}, r.body), "AddPortMapping")


def test_double_nat_detection() -> None:
    assert behind_another_nat("10.1.2.3")
    assert behind_another_nat("100.64.0.9")  # CGNAT, RFC 6598
    assert not behind_another_nat(PUBLIC)
    assert not behind_another_nat("not an address")


# --- hypothesis: parsers raise only PortMapError -------------------------------------------------

PARSERS = [
    parse_pcp_response,
    parse_natpmp_response,
    parse_ssdp_response,
    lambda d: parse_device_description(d, LOCATION),
    lambda d: parse_http_response(d, eof=True),
    lambda d: parse_http_response(d, eof=False),
    lambda d: parse_soap_response(HttpResponse(200, "OK", {}, d), "AddPortMapping"),
    lambda d: parse_soap_response(HttpResponse(500, "", {}, d), "AddPortMapping"),
]


def _only_port_map_errors(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(PortMapError):
            parse(data)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_portmap_error(data: bytes) -> None:
    _only_port_map_errors(data)


@given(st.binary(min_size=60, max_size=60))
def test_arbitrary_pcp_sized_bytes(data: bytes) -> None:
    _only_port_map_errors(bytes([2, 0x81]) + data[2:])
    _only_port_map_errors(bytes([0, 129]) + data[2:16])


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    return st.tuples(
        st.integers(0, len(base)), st.integers(0, len(base)), st.binary(max_size=12)
    ).map(lambda t: base[: min(t[0], t[1])] + t[2] + base[max(t[0], t[1]) :])


@given(_mutations(DESCRIPTION))
@settings(max_examples=300)
def test_mutated_descriptions(data: bytes) -> None:
    _only_port_map_errors(data)


@given(_mutations(SSDP_ANSWER) | _mutations(soap_fault(718, "ConflictInMappingEntry").body))
def test_mutated_ssdp_and_soap(data: bytes) -> None:
    _only_port_map_errors(data)
    _only_port_map_errors(b"HTTP/1.1 500 Oops\r\nContent-Length: 999\r\n\r\n" + data)


_TAGS = st.sampled_from(
    [
        "root",
        "device",
        "deviceList",
        "serviceList",
        "service",
        "serviceType",
        "controlURL",
        "URLBase",
        "s:Envelope",
        "s:Body",
        "s:Fault",
        "UPnPError",
        "errorCode",
        "AddPortMappingResponse",
    ]
)
_TEXT = st.sampled_from(
    [
        "",
        "urn:schemas-upnp-org:service:WANIPConnection:1",
        "/ctl",
        "http://192.168.1.1:5000/x",
        "http://[::1",
        "http://192.168.1.1:70000/",
        "//evil",
        "718",
        "99999999999",
        "&amp;",
        "é",
        "\x00",
    ]
)


def _xml_tree(depth: int) -> st.SearchStrategy[str]:
    leaf = st.builds(lambda t, x: f"<{t}>{x}</{t}>", _TAGS, _TEXT)
    if depth == 0:
        return leaf
    return leaf | st.builds(
        lambda t, kids: f"<{t}>{''.join(kids)}</{t}>",
        _TAGS,
        st.lists(_xml_tree(depth - 1), max_size=4),
    )


@given(_xml_tree(4))
@settings(max_examples=300)
def test_generated_xml(doc: str) -> None:
    _only_port_map_errors(doc.encode("utf-8", "surrogatepass"))
    _only_port_map_errors(f'<root xmlns:s="x">{doc}</root>'.encode())


@given(st.text(max_size=80))
def test_arbitrary_urls(text: str) -> None:
    with contextlib.suppress(PortMapError):
        parse_url(text)


# --- the state machine on a fake clock -----------------------------------------------------------


def mapper(**options: object) -> PortMapper:
    defaults: dict[str, object] = {"nonce": NONCE, "rng": random.Random(7)}
    defaults.update(options)
    return PortMapper(GATEWAY, BOX, PORT, **defaults)  # type: ignore[arg-type]


def sent(m: PortMapper) -> list[tuple[bytes, tuple[str, int]]]:
    return m.datagrams_to_send()


def only(m: PortMapper) -> tuple[bytes, tuple[str, int]]:
    out = sent(m)
    assert len(out) == 1, out
    return out[0]


def ssdp_packets(out: list[tuple[bytes, tuple[str, int]]]) -> list[tuple[str, int]]:
    return [addr for data, addr in out if data.startswith(b"M-SEARCH")]


PCP_ADDR = (GATEWAY, 5351)


def test_pcp_first_then_renew_at_half_life() -> None:
    m = mapper()
    m.start(0.0)
    data, addr = only(m)
    assert addr == PCP_ADDR and data[:2] == b"\x02\x01"
    assert m.next_timer() == 3.0  # RFC 6887 initial retransmission timeout
    m.receive_datagram(pcp_map_response(lifetime=7200, epoch=1000), PCP_ADDR, 0.5)
    assert m.events() == [MappingAcquired(Method.PCP, PUBLIC, PORT, 7200)]
    assert m.candidate() == (PUBLIC, PORT)
    assert m.next_timer() == 0.5 + 3600
    m.handle_timer(3000.0)  # not due: nothing happens
    assert sent(m) == [] and m.phase is Phase.MAPPED
    m.handle_timer(3600.5)
    renewal, _ = only(m)
    # Same nonce, and it suggests the port it holds (RFC 6887 §11.2.1).
    assert renewal[24:36] == NONCE and renewal[42:44] == PORT.to_bytes(2, "big")
    m.receive_datagram(pcp_map_response(lifetime=7200, epoch=1000 + 3600), PCP_ADDR, 3601.0)
    assert m.events() == [MappingRenewed(Method.PCP, 7200)]
    assert m.next_timer() == 3601.0 + 3600


def test_fallback_order_and_failure_summary() -> None:
    m = mapper()
    m.start(0.0)
    assert only(m)[1] == PCP_ADDR
    m.handle_timer(3.0)
    assert only(m)[1] == PCP_ADDR  # second PCP attempt
    assert m.next_timer() == 9.0
    m.handle_timer(9.0)
    assert only(m) == (b"\x00\x00", PCP_ADDR)  # NAT-PMP external address request
    now = 9.0
    for timeout in (0.25, 0.5, 1.0):
        now += timeout
        m.handle_timer(now)
        assert only(m) == (b"\x00\x00", PCP_ADDR)
    now += 2.0
    m.handle_timer(now)  # NAT-PMP gave up: UPnP discovery, unicast and multicast, both IGD versions
    out = sent(m)
    assert ssdp_packets(out) == [(GATEWAY, 1900), ("239.255.255.250", 1900)] * 2
    m.handle_timer(now + 1.0)
    assert len(ssdp_packets(sent(m))) == 4  # sent twice
    m.handle_timer(now + 3.0)
    [failed] = m.events()
    assert isinstance(failed, MappingFailed)
    assert failed.summary == (
        "no port mapping: the router answered neither PCP nor NAT-PMP, and no UPnP gateway replied"
    )
    assert failed.reasons == {
        "pcp": "the router did not answer PCP",
        "nat-pmp": "the router did not answer NAT-PMP",
        "upnp": "no UPnP gateway replied",
    }
    assert failed.advice.endswith("forward UDP port 41641 to 192.168.1.10 by hand")
    assert failed.retry_in == 30.0
    assert m.next_timer() == now + 3.0 + 30.0
    # Backoff: the retry starts over with PCP, and the next failure waits longer.
    m.handle_timer(now + 33.0)
    assert only(m)[1] == PCP_ADDR
    m.port_unreachable(now + 33.1)
    m.handle_timer(now + 33.1 + 1.0)
    m.handle_timer(now + 33.1 + 3.0)
    [again] = m.events()
    assert isinstance(again, MappingFailed) and again.retry_in == 60.0


def test_icmp_unreachable_skips_to_upnp() -> None:
    m = mapper()
    m.start(0.0)
    sent(m)
    m.port_unreachable(0.01)
    assert ssdp_packets(sent(m))  # straight to SSDP, no NAT-PMP timeouts
    assert [(a.method, a.outcome) for a in m._attempts] == [
        (Method.PCP, Outcome.UNREACHABLE),
        (Method.NATPMP, Outcome.UNREACHABLE),
    ]


def test_natpmp_only_router() -> None:
    m = mapper(lifetime=3600)
    m.start(0.0)
    sent(m)
    # RFC 6887 §9: a NAT-PMP server answers a version-2 request "unsupported version".
    m.receive_datagram(bytes([0, 129, 0, 1, 0, 0, 0, 40]), PCP_ADDR, 0.01)
    assert only(m) == (b"\x00\x00", PCP_ADDR)
    m.receive_datagram(natpmp_address_response(), PCP_ADDR, 0.02)
    request, _ = only(m)
    assert request == encode_natpmp_map(internal_port=PORT, external_port=PORT, lifetime=3600)
    m.receive_datagram(natpmp_map_response(external=50123, lifetime=3600), PCP_ADDR, 0.03)
    assert m.events() == [MappingAcquired(Method.NATPMP, PUBLIC, 50123, 3600)]
    assert m.next_timer() == pytest.approx(1800.03)
    m.handle_timer(1800.03)
    assert only(m) == (b"\x00\x00", PCP_ADDR)  # renewal asks the address again
    m.receive_datagram(natpmp_address_response(epoch=1850), PCP_ADDR, 1800.04)
    renewal, _ = only(m)
    assert renewal == encode_natpmp_map(internal_port=PORT, external_port=50123, lifetime=3600)
    m.receive_datagram(
        natpmp_map_response(epoch=1851, external=50123, lifetime=3600), PCP_ADDR, 1800.05
    )
    assert m.events() == [MappingRenewed(Method.NATPMP, 3600)]


def test_pcp_refusal_falls_back_with_its_reason() -> None:
    m = mapper(methods=(Method.PCP, Method.NATPMP))
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(result=2), PCP_ADDR, 0.01)
    sent(m)
    m.receive_datagram(natpmp_address_response(result=2), PCP_ADDR, 0.02)
    [failed] = m.events()
    assert isinstance(failed, MappingFailed)
    assert failed.summary == (
        "no port mapping: PCP: the router refuses port mappings (PCP is turned off or restricted), "
        "and NAT-PMP: the router refuses port mappings (NAT-PMP is turned off)"
    )


def test_foreign_and_malformed_datagrams_are_ignored() -> None:
    m = mapper()
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(nonce=bytes(12)), PCP_ADDR, 0.1)  # another nonce
    m.receive_datagram(pcp_map_response(), ("192.0.2.9", 5351), 0.1)  # not the gateway
    m.receive_datagram(pcp_map_response()[:30], PCP_ADDR, 0.1)
    m.receive_datagram(b"", PCP_ADDR, 0.1)
    assert m.events() == [] and m.phase is Phase.PCP
    m.receive_datagram(pcp_map_response(), PCP_ADDR, 0.2)
    assert isinstance(m.events()[0], MappingAcquired)


def test_renewal_without_answer_retries_then_loses_and_starts_over() -> None:
    m = mapper(lifetime=100, methods=(Method.PCP,), pcp_timeouts=(1.0,))
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(lifetime=100), PCP_ADDR, 0.0)
    m.events()
    # Renew at 50; each unanswered attempt (1 s) waits half the remaining time, until expiry.
    for attempt_at in (50.0, 75.5, 88.25, 94.625, 97.8125):
        assert m.next_timer() == pytest.approx(attempt_at)
        m.handle_timer(attempt_at)
        assert only(m)[1] == PCP_ADDR
        m.handle_timer(attempt_at + 1.0)
        assert m.events() == [] and m.mapping is not None
    assert m.next_timer() == 100.0  # under MIN_RENEW left: the last chance is the expiry
    m.handle_timer(100.0)
    assert m.events() == [
        MappingLost(Method.PCP, "the mapping expired: the router stopped answering renewals")
    ]
    assert m.mapping is None and m.phase is Phase.PCP and not m._renewing  # started over
    assert only(m)[0][:2] == b"\x02\x01"


def test_renewal_refused_loses_and_starts_over() -> None:
    m = mapper(lifetime=100)
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(lifetime=100), PCP_ADDR, 0.0)
    m.events()
    m.handle_timer(50.0)
    sent(m)
    m.receive_datagram(pcp_map_response(result=8), PCP_ADDR, 50.1)
    [lost] = m.events()
    assert lost == MappingLost(Method.PCP, "renewal refused: PCP: the router is out of mappings")
    assert m.phase is Phase.PCP and m._attempts == []


def test_changed_external_port_on_renewal_is_announced() -> None:
    m = mapper(lifetime=100)
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(lifetime=100), PCP_ADDR, 0.0)
    m.events()
    m.handle_timer(50.0)
    sent(m)
    m.receive_datagram(
        pcp_map_response(lifetime=100, external_port=60000, epoch=1050), PCP_ADDR, 50.0
    )
    assert m.events() == [MappingAcquired(Method.PCP, PUBLIC, 60000, 100)]


def test_announce_with_a_reset_epoch_renews_at_once() -> None:
    m = mapper()
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(epoch=1000), PCP_ADDR, 0.0)
    m.events()
    m.receive_datagram(pcp_announce(epoch=1010), PCP_ADDR, 10.0)  # consistent: nothing to do
    assert sent(m) == []
    m.receive_datagram(pcp_announce(epoch=3), PCP_ADDR, 20.0)  # the router restarted
    assert only(m)[0][24:36] == NONCE


def test_double_nat_mapping_is_not_a_candidate() -> None:
    m = mapper()
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(external_ip=bytes([100, 64, 3, 4])), PCP_ADDR, 0.0)
    [acquired] = m.events()
    assert isinstance(acquired, MappingAcquired) and acquired.behind_another_nat
    assert m.candidate() is None


def test_delete_on_close_pcp() -> None:
    m = mapper()
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(), PCP_ADDR, 0.0)
    m.events()
    m.close(10.0)
    delete, addr = only(m)
    assert addr == PCP_ADDR
    assert delete == encode_pcp_map(
        client_ip=BOX,
        nonce=NONCE,
        internal_port=PORT,
        lifetime=0,
        external_port=PORT,
        external_ip=PUBLIC,
    )
    assert not m.closed
    m.receive_datagram(pcp_map_response(lifetime=0), PCP_ADDR, 10.1)
    assert m.closed and m.next_timer() is None
    assert m.events() == [MappingLost(Method.PCP, "deleted on shutdown")]


def test_delete_on_close_natpmp_unanswered() -> None:
    m = mapper(methods=(Method.NATPMP,))
    m.start(0.0)
    sent(m)
    m.receive_datagram(natpmp_address_response(), PCP_ADDR, 0.0)
    sent(m)
    m.receive_datagram(natpmp_map_response(), PCP_ADDR, 0.0)
    m.events()
    m.close(5.0)
    assert only(m) == (bytes.fromhex("00010000a2a9000000000000"), PCP_ADDR)
    m.handle_timer(7.0)  # CLOSE_TIMEOUT without an answer
    assert m.closed
    [lost] = m.events()
    assert isinstance(lost, MappingLost) and "did not confirm" in lost.reason


def test_close_without_mapping_is_immediate() -> None:
    m = mapper()
    m.close(0.0)
    assert m.closed and sent(m) == [] and m.events() == []


# UPnP, driven by hand: SSDP answer -> description -> GetExternalIPAddress -> AddPortMapping.


def http_bytes(response: HttpResponse) -> bytes:
    head = f"HTTP/1.1 {response.status} {response.reason}\r\n"
    return f"{head}Content-Length: {len(response.body)}\r\n\r\n".encode() + response.body


def one_http(m: PortMapper) -> HttpRequest:
    out = m.http_requests_to_send()
    assert len(out) == 1, out
    return out[0]


def soap_action(request: HttpRequest) -> str:
    for line in request.data.split(b"\r\n"):
        if line.startswith(b"SOAPAction:"):
            return line.decode().split("#")[1].rstrip('"')
    return ""


def soap_arg(request: HttpRequest, name: str) -> str:
    body = request.data.partition(b"\r\n\r\n")[2]
    envelope = ElementTree.fromstring(body)  # noqa: S314 - our own request
    found = next(e for e in envelope.iter() if e.tag == name)
    return found.text or ""


def upnp_to_add(m: PortMapper, now: float = 0.0) -> HttpRequest:
    m.start(now)
    m.port_unreachable(now)
    sent(m)
    m.receive_datagram(SSDP_ANSWER, (GATEWAY, 1900), now)
    get = one_http(m)
    assert (get.host, get.port) == (GATEWAY, 5000)
    assert get.data.startswith(b"GET /rootDesc.xml HTTP/1.1\r\nHost: 192.168.1.1:5000\r\n")
    m.http_response(get.request_id, http_bytes(HttpResponse(200, "OK", {}, DESCRIPTION)), now)
    ext = one_http(m)
    assert soap_action(ext) == "GetExternalIPAddress"
    answer = soap_ok(
        "GetExternalIPAddress", f"<NewExternalIPAddress>{PUBLIC}</NewExternalIPAddress>"
    )
    m.http_response(ext.request_id, http_bytes(answer), now)
    add = one_http(m)
    assert soap_action(add) == "AddPortMapping"
    return add


def test_upnp_conflict_718_tries_another_port() -> None:
    m = mapper(lifetime=3600)
    add = upnp_to_add(m)
    assert soap_arg(add, "NewExternalPort") == str(PORT)
    assert soap_arg(add, "NewInternalClient") == BOX
    m.http_response(add.request_id, http_bytes(soap_fault(718, "ConflictInMappingEntry")), 0.1)
    retry = one_http(m)
    other = int(soap_arg(retry, "NewExternalPort"))
    assert other != PORT and 1024 <= other <= 65535
    m.http_response(retry.request_id, http_bytes(soap_ok("AddPortMapping")), 0.2)
    assert m.events() == [MappingAcquired(Method.UPNP, PUBLIC, other, 3600)]
    assert m.next_timer() == pytest.approx(1800.2)
    # Renewal: external address again, then the same port again.
    m.handle_timer(1800.2)
    ext = one_http(m)
    assert soap_action(ext) == "GetExternalIPAddress"
    answer = soap_ok(
        "GetExternalIPAddress", f"<NewExternalIPAddress>{PUBLIC}</NewExternalIPAddress>"
    )
    m.http_response(ext.request_id, http_bytes(answer), 1800.3)
    again = one_http(m)
    assert soap_arg(again, "NewExternalPort") == str(other)
    m.http_response(again.request_id, http_bytes(soap_ok("AddPortMapping")), 1800.4)
    assert m.events() == [MappingRenewed(Method.UPNP, 3600)]
    # Close deletes that port.
    m.close(1900.0)
    delete = one_http(m)
    assert soap_action(delete) == "DeletePortMapping"
    assert soap_arg(delete, "NewExternalPort") == str(other)
    m.http_response(delete.request_id, http_bytes(soap_ok("DeletePortMapping")), 1900.1)
    assert m.closed and m.events() == [MappingLost(Method.UPNP, "deleted on shutdown")]


def test_upnp_gives_up_after_repeated_conflicts() -> None:
    m = mapper()
    add = upnp_to_add(m)
    for _ in range(4):
        m.http_response(add.request_id, http_bytes(soap_fault(718, "ConflictInMappingEntry")), 0.1)
        requests = m.http_requests_to_send()
        if not requests:
            break
        add = requests[0]
    [failed] = m.events()
    assert isinstance(failed, MappingFailed)
    assert "718 ConflictInMappingEntry" in failed.reasons["upnp"]


def test_upnp_permanent_lease_fallback() -> None:
    m = mapper()
    add = upnp_to_add(m)
    m.http_response(
        add.request_id, http_bytes(soap_fault(725, "OnlyPermanentLeasesSupported")), 0.1
    )
    retry = one_http(m)
    assert soap_arg(retry, "NewLeaseDuration") == "0"
    m.http_response(retry.request_id, http_bytes(soap_ok("AddPortMapping")), 0.2)
    assert m.events() == [MappingAcquired(Method.UPNP, PUBLIC, PORT, 0)]
    assert m.next_timer() == pytest.approx(1800.2)  # refreshed all the same


def test_upnp_ignores_answers_from_other_hosts() -> None:
    m = mapper(methods=(Method.UPNP,))
    m.start(0.0)
    sent(m)
    m.receive_datagram(SSDP_ANSWER, ("192.168.1.50", 1900), 0.1)  # a media server, say
    assert m.http_requests_to_send() == []
    m.handle_timer(1.0)
    m.handle_timer(3.0)
    [failed] = m.events()
    assert isinstance(failed, MappingFailed)
    assert failed.reasons["upnp"] == (
        "no UPnP gateway replied (192.168.1.50 answered but is not the default gateway)"
    )


def test_upnp_falls_through_services_without_an_address() -> None:
    m = mapper(description_url=LOCATION, methods=(Method.UPNP,))
    m.start(0.0)
    get = one_http(m)
    m.http_response(get.request_id, http_bytes(HttpResponse(200, "OK", {}, DESCRIPTION)), 0.0)
    first = one_http(m)
    assert b"/ctl/IPConn" in first.data.split(b"\r\n")[0]
    m.http_failed(first.request_id, "connection reset", 0.1)
    second = one_http(m)
    assert b"/ctl/PPPConn" in second.data.split(b"\r\n")[0]
    answer = soap_ok("GetExternalIPAddress", "<NewExternalIPAddress>0.0.0.0</NewExternalIPAddress>")
    m.http_response(second.request_id, http_bytes(answer), 0.2)
    [failed] = m.events()
    assert isinstance(failed, MappingFailed)
    assert failed.reasons["upnp"] == "UPnP: the router has no internet address yet"


def test_upnp_http_timeout_is_a_failure_and_late_answers_are_ignored() -> None:
    m = mapper(description_url=LOCATION, methods=(Method.UPNP,), http_timeout=5.0)
    m.start(0.0)
    get = one_http(m)
    assert get.deadline == 5.0 and m.next_timer() == 5.0
    m.handle_timer(5.0)
    [failed] = m.events()
    assert isinstance(failed, MappingFailed)
    assert "in time" in failed.reasons["upnp"]
    m.http_response(get.request_id, http_bytes(HttpResponse(200, "OK", {}, DESCRIPTION)), 5.1)
    assert m.http_requests_to_send() == [] and m.phase is Phase.BACKOFF


@given(
    st.lists(
        st.tuples(
            st.sampled_from([PCP_ADDR, (GATEWAY, 1900), ("192.0.2.1", 5351)]),
            st.binary(max_size=80)
            | st.sampled_from(
                [
                    pcp_map_response(),
                    natpmp_address_response(),
                    natpmp_map_response(),
                    SSDP_ANSWER,
                    pcp_announce(1),
                    pcp_map_response(result=2),
                    bytes([0, 129, 0, 1, 0, 0, 0, 1]),
                ]
            ),
            st.floats(0, 5000),
            st.sampled_from(["datagram", "timer", "http", "unreachable", "close", "refresh"]),
        ),
        max_size=40,
    )
)
@settings(max_examples=200)
def test_state_machine_survives_anything(
    steps: list[tuple[tuple[str, int], bytes, float, str]],
) -> None:
    m = mapper(description_url=None)
    now = 0.0
    m.start(now)
    for addr, data, dt, action in steps:
        now += dt
        if action == "datagram":
            m.receive_datagram(data, addr, now)
        elif action == "timer":
            m.handle_timer(m.next_timer() or now)
        elif action == "http":
            for request in m.http_requests_to_send():
                m.http_response(request.request_id, data, now)
        elif action == "unreachable":
            m.port_unreachable(now)
        elif action == "close":
            m.close(now)
        else:
            m.refresh(now)
        m.datagrams_to_send()
        m.events()
        deadline = m.next_timer()
        assert deadline is None or deadline >= 0


def test_short_lifetimes_still_renew_at_half() -> None:
    m = mapper(lifetime=2)
    m.start(10.0)
    sent(m)
    m.receive_datagram(pcp_map_response(lifetime=2), PCP_ADDR, 10.0)
    m.events()
    assert m.next_timer() == 11.0
    m.handle_timer(11.0)
    assert only(m)[0][4:8] == (2).to_bytes(4, "big")


def test_three_refusals_summary_as_the_docs_show() -> None:
    m = mapper(description_url=LOCATION)
    m.start(0.0)
    sent(m)
    m.receive_datagram(pcp_map_response(result=2), PCP_ADDR, 0.0)
    sent(m)
    m.receive_datagram(natpmp_address_response(result=2), PCP_ADDR, 0.0)
    get = one_http(m)
    m.http_response(get.request_id, http_bytes(HttpResponse(200, "OK", {}, DESCRIPTION)), 0.0)
    ext = one_http(m)
    answer = soap_ok(
        "GetExternalIPAddress", f"<NewExternalIPAddress>{PUBLIC}</NewExternalIPAddress>"
    )
    m.http_response(ext.request_id, http_bytes(answer), 0.0)
    add = one_http(m)
    m.http_response(add.request_id, http_bytes(soap_fault(606, "Action not authorized")), 0.0)
    [failed] = m.events()
    assert isinstance(failed, MappingFailed)
    expected = (
        "no port mapping: PCP: the router refuses port mappings (PCP is turned off or restricted),"
        " NAT-PMP: the router refuses port mappings (NAT-PMP is turned off), and the UPnP gateway"
        " refused the mapping: UPnP error 606 Action not authorized (the router requires"
        " authorisation for this action)"
    )
    assert failed.summary == expected


def test_upnp_renewal_survives_an_unreachable_gateway() -> None:
    m = mapper(lifetime=3600)
    add = upnp_to_add(m)
    m.http_response(add.request_id, http_bytes(soap_ok("AddPortMapping")), 0.0)
    m.events()
    m.handle_timer(1800.0)
    m.http_failed(one_http(m).request_id, "connection refused", 1800.1)
    assert m.events() == [] and m.mapping is not None
    assert m.next_timer() == pytest.approx(1800.1 + (3600 - 1800.1) / 2)
