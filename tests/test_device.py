"""agentsight_middleware._device: user-agents' classification on ua-parser 1.0's resolvers.

The reference is what _facts did before issue #7: ``user_agents.parse`` and its
is_tablet / is_mobile / is_pc / is_bot. Every entry of the corpora below must classify
the same both ways, except the documented, deliberate differences in
``DIFFERENT_ON_PURPOSE``.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import user_agents  # type: ignore[import-untyped]

from agentsight_middleware import _device, _facts
from agentsight_middleware._device import backend, classify_user_agent

from .conftest import in_forked_child

Classification = tuple[str | None, bool]


def reference(ua: str) -> Classification:
    """_facts.classify_user_agent as it was before #7, on user-agents' own parser."""
    if not ua or ua.isspace():
        return None, False
    parsed = user_agents.parse(ua[: _device._MAX_USER_AGENT])
    if parsed.is_tablet:
        kind: str | None = "tablet"
    elif parsed.is_mobile:
        kind = "mobile"
    elif parsed.is_pc:
        kind = "desktop"
    else:
        kind = None
    return kind, bool(parsed.is_bot)


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    # Tests below swap the engine; no result of theirs may outlive them in the cache.
    _device._classify.cache_clear()
    yield
    _device._classify.cache_clear()


def _rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the next call build the engine again (monkeypatch restores the old one)."""
    monkeypatch.setattr(_device, "_engine", None)
    _device._classify.cache_clear()


def _block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Makes ``import module`` fail as if the package were not installed."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


# ---------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------

CHROME = "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0"
SAFARI_IOS = "AppleWebKit/605.1.15 (KHTML, like Gecko)"

#: Real agents as browsers, apps, devices and bots send them, with the class each gets.
CORPUS: Final[dict[str, tuple[str, Classification]]] = {
    # Desktop browsers
    "chrome-windows": (
        f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) {CHROME} Safari/537.36",
        ("desktop", False),
    ),
    "chrome-mac": (
        f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) {CHROME} Safari/537.36",
        ("desktop", False),
    ),
    "chrome-linux": (f"Mozilla/5.0 (X11; Linux x86_64) {CHROME} Safari/537.36", ("desktop", False)),
    "chromebook": (
        f"Mozilla/5.0 (X11; CrOS x86_64 15886.44.0) {CHROME} Safari/537.36",
        ("desktop", False),
    ),
    "firefox-windows": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
        ("desktop", False),
    ),
    "firefox-ubuntu": (
        "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0",
        ("desktop", False),
    ),
    "firefox-mac": (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14.5; rv:127.0) Gecko/20100101 Firefox/127.0",
        ("desktop", False),
    ),
    "safari-mac": (
        f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) {SAFARI_IOS} Version/17.5 "
        "Safari/605.1.15",
        ("desktop", False),
    ),
    "edge-windows": (
        f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) {CHROME} Safari/537.36 Edg/126.0.2592.87",
        ("desktop", False),
    ),
    "opera-windows": (
        f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) {CHROME} Safari/537.36 OPR/111.0.0.0",
        ("desktop", False),
    ),
    "ie11-windows": (
        "Mozilla/5.0 (Windows NT 10.0; WOW64; Trident/7.0; rv:11.0) like Gecko",
        ("desktop", False),
    ),
    "ie6-xp": ("Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1; SV1)", ("desktop", False)),
    "windows-rt": (
        "Mozilla/5.0 (compatible; MSIE 10.0; Windows NT 6.2; ARM; Trident/6.0)",
        ("tablet", False),
    ),
    "windows-98": (
        "Mozilla/4.0 (compatible; MSIE 5.5; Windows 98; Win 9x 4.90)",
        ("desktop", False),
    ),
    "headless-chrome": (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "HeadlessChrome/126.0.6478.126 Safari/537.36",
        ("desktop", False),
    ),
    "electron-app": (
        f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) {CHROME} Slack/4.39.90 Electron/30.1.0 "
        "Safari/537.36",
        ("desktop", False),
    ),
    # Phones
    "iphone-safari": (
        f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) {SAFARI_IOS} Version/17.5 "
        "Mobile/15E148 Safari/604.1",
        ("mobile", False),
    ),
    "iphone-chrome": (
        f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) {SAFARI_IOS} "
        "CriOS/126.0.6478.54 Mobile/15E148 Safari/604.1",
        ("mobile", False),
    ),
    "iphone-firefox": (
        f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) {SAFARI_IOS} FxiOS/127.0 "
        "Mobile/15E148 Safari/605.1.15",
        ("mobile", False),
    ),
    "iphone-facebook-app": (
        f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) {SAFARI_IOS} Mobile/15E148 "
        "[FBAN/FBIOS;FBAV/469.0.0.35.106;FBBV/612094425;FBDV/iPhone15,2;FBMD/iPhone;FBSN/iOS;"
        "FBSV/17.5;FBSS/3;FBID/phone;FBLC/en_US;FBOP/5]",
        ("mobile", False),
    ),
    "ipod": (
        "Mozilla/5.0 (iPod touch; CPU iPhone OS 12_5_7 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/12.1.2 Mobile/15E148 Safari/604.1",
        ("mobile", False),
    ),
    "android-pixel-chrome": (
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.6478.122 Mobile Safari/537.36",
        ("mobile", False),
    ),
    "android-reduced-ua": (
        "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Mobile Safari/537.36",
        ("mobile", False),
    ),
    "android-samsung-internet": (
        "Mozilla/5.0 (Linux; Android 14; SM-S928B) AppleWebKit/537.36 (KHTML, like Gecko) "
        "SamsungBrowser/25.0 Chrome/121.0.0.0 Mobile Safari/537.36",
        ("mobile", False),
    ),
    "android-firefox": (
        "Mozilla/5.0 (Android 14; Mobile; rv:127.0) Gecko/127.0 Firefox/127.0",
        ("mobile", False),
    ),
    "android-webview": (
        "Mozilla/5.0 (Linux; Android 13; SM-A536B Build/TP1A.220624.014; wv) "
        "AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/126.0.6478.71 "
        "Mobile Safari/537.36",
        ("mobile", False),
    ),
    "android-old-stock": (
        "Mozilla/5.0 (Linux; U; Android 4.0.4; en-gb; GT-I9300 Build/IMM76D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Mobile Safari/534.30",
        ("mobile", False),
    ),
    "opera-mini": (
        "Opera/9.80 (J2ME/MIDP; Opera Mini/9.80 (J2ME/22.478; U; en) Presto/2.5.25 Version/10.54",
        ("mobile", False),
    ),
    "windows-phone": (
        "Mozilla/5.0 (compatible; MSIE 9.0; Windows Phone OS 7.5; Trident/5.0; IEMobile/9.0; "
        "SAMSUNG; SGH-i917)",
        ("mobile", False),
    ),
    "blackberry": (
        "Mozilla/5.0 (BlackBerry; U; BlackBerry 9800; zh-TW) AppleWebKit/534.8+ "
        "(KHTML, like Gecko) Version/6.0.0.448 Mobile Safari/534.8+",
        ("mobile", False),
    ),
    "nokia-symbian": (
        "Mozilla/5.0 (SymbianOS/9.4; Series60/5.0 NokiaN97-1/12.0.024; Profile/MIDP-2.1 "
        "Configuration/CLDC-1.1; en-us) AppleWebKit/525 (KHTML, like Gecko) BrowserNG/7.1.12344",
        ("mobile", False),
    ),
    # user-agents knows no KaiOS: a phone it cannot place.
    "kaios": (
        "Mozilla/5.0 (Mobile; Nokia_8110_4G; rv:48.0) Gecko/48.0 Firefox/48.0 KAIOS/2.5",
        (None, False),
    ),
    # Tablets and e-readers
    "ipad-safari": (
        f"Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) {SAFARI_IOS} Version/17.5 "
        "Mobile/15E148 Safari/604.1",
        ("tablet", False),
    ),
    # iPadOS 13+ asks for desktop sites by default and says "Macintosh": nobody can tell.
    "ipad-desktop-mode": (
        f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) {SAFARI_IOS} Version/17.5 "
        "Safari/605.1.15",
        ("desktop", False),
    ),
    "android-galaxy-tab": (
        "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.6478.122 Safari/537.36",
        ("tablet", False),
    ),
    "android-pixel-tablet": (
        "Mozilla/5.0 (Linux; Android 14; Pixel Tablet) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36",
        ("tablet", False),
    ),
    "android-nexus-7": (
        "Mozilla/5.0 (Linux; Android 4.1.1; Nexus 7 Build/JRO03D) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.166  Safari/535.19",
        ("tablet", False),
    ),
    "android-old-galaxy-tab": (
        "Mozilla/5.0 (Linux; U; Android 2.2; en-us; SCH-I800 Build/FROYO) AppleWebKit/533.1 "
        "(KHTML, like Gecko) Version/4.0 Mobile Safari/533.1",
        ("mobile", False),  # says "Mobile Safari", and uap-core does not know the model
    ),
    "kindle-fire-silk": (
        "Mozilla/5.0 (Linux; Android 9; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Silk/126.3.1 like Chrome/126.0.6478.153 Safari/537.36",
        ("tablet", False),
    ),
    "kindle-fire-old-silk": (
        "Mozilla/5.0 (Macintosh; U; Intel Mac OS X 10_6_3; en-us; Silk/1.1.0-80) "
        "AppleWebKit/533.16 (KHTML, like Gecko) Version/5.0 Safari/533.16 Silk-Accelerated=true",
        ("tablet", False),
    ),
    "kindle-e-reader": (
        "Mozilla/5.0 (X11; U; Linux armv7l like Android; en-us) AppleWebKit/531.2+ "
        "(KHTML, like Gecko) Version/5.0 Safari/533.2+ Kindle/3.0+",
        ("tablet", False),
    ),
    "blackberry-playbook": (
        "Mozilla/5.0 (PlayBook; U; RIM Tablet OS 2.0.1; en-US) AppleWebKit/535.8+ "
        "(KHTML, like Gecko) Version/7.2.0.1 Safari/535.8+",
        ("tablet", False),
    ),
    # TVs and consoles: most are neither, a few pass for something else.
    "samsung-tizen-tv": (
        "Mozilla/5.0 (SMART-TV; LINUX; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) "
        "76.0.3809.146/6.0 TV Safari/537.36",
        (None, False),
    ),
    "lg-webos-tv": (
        "Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/87.0.4280.88 Safari/537.36 WebAppManager",
        (None, False),
    ),
    "android-tv-bravia": (
        "Mozilla/5.0 (Linux; Android 10; BRAVIA 4K VH2 Build/QTG3.200305.006.S292) "
        "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.230 Safari/537.36",
        ("tablet", False),
    ),
    "chromecast": (
        "Mozilla/5.0 (X11; Linux armv7l) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/114.0.0.0 Safari/537.36 CrKey/1.56.500000 DeviceType/AndroidTV",
        ("desktop", False),
    ),
    "roku": ("Roku/DVP-13.0 (13.0.0.4136-C8)", (None, False)),
    "apple-tv": ("AppleTV11,1/11.1", (None, False)),
    "fire-tv": (
        "Mozilla/5.0 (Linux; Android 9; AFTMM Build/PS7633.3445N; wv) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/126.0.6478.134 Mobile Safari/537.36",
        ("mobile", False),
    ),
    "playstation-5": (
        "Mozilla/5.0 (PlayStation; PlayStation 5/8.20) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/15.4 Safari/605.1.15",
        (None, False),
    ),
    "xbox": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox One) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Edge/44.18363.8131",
        ("desktop", False),
    ),
    "nintendo-switch": (
        "Mozilla/5.0 (Nintendo Switch; WifiWebAuthApplet) AppleWebKit/606.4 "
        "(KHTML, like Gecko) NF/6.0.1.15.4 NintendoBrowser/5.1.0.20389",
        (None, False),
    ),
    "playstation-vita": (
        "Mozilla/5.0 (PlayStation Vita 3.74) AppleWebKit/537.73 (KHTML, like Gecko) Silk/3.2",
        ("mobile", False),
    ),
    # Mail clients
    "outlook": (
        "Mozilla/4.0 (compatible; MSIE 7.0; Windows NT 6.1; Trident/6.0; Microsoft Outlook "
        "15.0.4420)",
        ("desktop", False),
    ),
    "thunderbird": (
        "Mozilla/5.0 (X11; Linux x86_64; rv:38.0) Gecko/20100101 Thunderbird/38.2.0 "
        "Lightning/4.0.2",
        ("desktop", False),
    ),
    # Bots and tools
    "googlebot": (
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        (None, True),
    ),
    "googlebot-smartphone": (
        "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/126.0.6478.126 Mobile Safari/537.36 "
        "(compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        ("mobile", True),
    ),
    "googlebot-desktop-chrome": (
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Googlebot/2.1; "
        "+http://www.google.com/bot.html) Chrome/126.0.6478.126 Safari/537.36",
        (None, True),
    ),
    "bingbot": (
        "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
        (None, True),
    ),
    "bingbot-chrome": (
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; "
        "+http://www.bing.com/bingbot.htm) Chrome/116.0.1938.76 Safari/537.36",
        (None, True),
    ),
    "yandexbot": (
        "Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
        (None, True),
    ),
    "baiduspider": (
        "Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
        (None, True),
    ),
    "duckduckbot": ("DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)", (None, True)),
    "ahrefsbot": (
        "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
        (None, True),
    ),
    "facebookexternalhit": (
        "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
        (None, True),
    ),
    "twitterbot": ("Twitterbot/1.0", (None, True)),
    "slackbot": (
        "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
        (None, True),
    ),
    "gptbot": (
        "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; "
        "+https://openai.com/gptbot)",
        (None, True),
    ),
    "uptimerobot": (
        "Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
        (None, True),
    ),
    # HTTP libraries are not "Spider" to uap-core; _facts.DEFAULT_NON_BROWSER_AGENTS is
    # what keeps them out of the page views.
    "curl": ("curl/8.5.0", (None, False)),
    "wget": ("Wget/1.21.4", (None, False)),
    "python-requests": ("python-requests/2.32.3", (None, False)),
    "python-urllib": ("Python-urllib/3.11", (None, True)),
    "python-httpx": ("python-httpx/0.27.0", (None, False)),
    "go-http-client": ("Go-http-client/2.0", (None, False)),
    "okhttp": ("okhttp/4.12.0", (None, False)),
    "axios": ("axios/1.7.2", (None, False)),
    "postman": ("PostmanRuntime/7.39.0", (None, False)),
    "java": ("Java/17.0.11", (None, True)),
    # Not agents at all
    "empty": ("", (None, False)),
    "blank": ("   \t ", (None, False)),
    "dash": ("-", (None, False)),
    "mozilla-only": ("Mozilla/5.0", (None, False)),
    "garbage-latin-1": ("\x00\xff" * 300, (None, False)),
    "control-chars": ("\x1b[31m\r\n\x07", (None, False)),
    "sql-injection": ("' OR 1=1 --", (None, False)),
    "json": ('{"user_agent": "Mozilla/5.0"}', (None, False)),
    # Beyond the 512-char cap: only the first 512 chars count.
    "padded-chrome": (
        f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) {CHROME} Safari/537.36 " + "x" * 20_000,
        ("desktop", False),
    ),
    "iphone-then-padding": (
        f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) {SAFARI_IOS} " + ";" * 100_000,
        ("mobile", False),
    ),
    "bot-past-the-cap": ("Mozilla/5.0 (" + "a" * 600 + "; Googlebot/2.1)", (None, False)),
}

#: 150 agents from uap-core's own test suites (tests/test_device.yaml, test_os.yaml and
#: test_ua.yaml at e3c5e63, Apache-2.0): one for each of 70 device brands, 40 OS families
#: and 40 browser families picked at random (seed 42), at most 180 chars each. Neither
#: ua-parser nor ua-parser-builtins ships these files, so the sample lives here.
UAP_CORE_SAMPLE: Final = (
    (
        "Mozilla/5.0 (Linux; Android 4.2.1; Streak 7 Build/JOP40D) AppleWebKit/537.22 "
        "(KHTML, like Gecko) Chrome/25.0.1364.169 Mobile Safari/537.22"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.0.4; de-de; MID705 Build/IMM76D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Safari/534.30"
    ),
    (
        "ERO247 Android Application (16, ero247 v2.2.2) - Runbo RunboX5-W Runbo - "
        "FFFFFFFF-D62C-F69A-B73B-73AC6A2241A7"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.1.1; M8 Build/JRO03H) AppleWebKit/537.31 (KHTML, like "
        "Gecko) Chrome/26.0.1410.58 Safari/537.31 OPR/14.0.1074.58201"
    ),
    "Opera/9.30 (Nintendo Wii; U; ; 3642; en)",
    (
        "Mozilla/5.0 (Linux; Android 4.1.1; VegaBean Beta 5 Build/JRO03L) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.166 Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; Android 7.0; ONEPLUS A3010 Build/NRD90M) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/55.0.2883.91 Mobile Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 2.2.2; ar-eg; ALCATEL_one_touch_908 Build/FRG83G) "
        "AppleWebKit/533.1 (KHTML, like Gecko) Version/4.0 Mobile Safari/533.1"
    ),
    (
        "Mozilla/5.0 (Linux U Android 1.5 en-us T-Mobile Opal Build/CRB2) AppleWebKit/528.5+ "
        "(KHTML, like Gecko) Version/3.1.2 Mobile Safari/525.20.1"
    ),
    (
        "UCWEB/2.0 (Linux; U; Adr 2.3.5; es-LA; USCCADR3305) U2/1.0.0 UCBrowser/9.1.0.297 "
        "U2/1.0.0 Mobile"
    ),
    (
        "Mozilla/5.0 (Spyglass 3.0; OpenTV) Gecko/20081010  InettvBrowser/1.0 "
        "(F00001;OTV-IB24L;2.4;00000),gzip(gfe),gzip(gfe),gzip(gfe)"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; KM-S220 Build/IMM76I) AppleWebKit/535.19 (KHTML, "
        "like Gecko) Chrome/18.0.1025.166 Mobile Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; I-Buddy 3 Build/IMM76D) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.166 Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 2.3.3; en-us; Android for Techvision TV1T808 Board "
        "Build/GRI40) AppleWebKit/533.1 (KHTML, like Gecko) Version/4.0 Mobile Safari/533.1"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 2.3.6; En-us; Cloudfone Thrill 400g "
        "Build/VENUS_00.03.150.H1105) AppleWebKit/533.1 (KHTML, Like Gecko) Version/4.0 "
        "Mobile Safari/533.1"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 2.1-update1-corvusMODV6; es-es; SmartQ V5 "
        "Build/ECLAIR) AppleWebKit/530.17 (KHTML, like Gecko) Version/4.0 Mobile "
        "Safari/530.17"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; PMID705X Build/IMM76D) AppleWebKit/537.22 "
        "(KHTML, like Gecko) Chrome/25.0.1364.169 Safari/537.22"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.3; GT-P6210 Build/IML74K) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.133 Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 2.3.7; de-de; Opal 800 Build/GINGERBREAD) "
        "AppleWebKit/533.1 (KHTML, like Gecko) Version/4.0 Mobile Safari/533.1"
    ),
    "Mozilla/4.0 (compatible; MSIE 4.01; Windows CE; PPC i-mate JAMA; 240x320)",
    (
        "Mozilla/5.0 (Linux; Android 4.0.3; Wxt Tab PC 65CXi Build/IML74K) "
        "AppleWebKit/535.19 (KHTML, like Gecko) Chrome/18.0.1025.166 Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; HUAWEI U8950N-51 Build/HuaweiU8950N-51) "
        "AppleWebKit/537.22 (KHTML, like Gecko) Chrome/25.0.1364.123 Mobile Safari/537.22"
    ),
    "Mozilla/4.0 (compatible; MSIE 7.0; Windows Phone OS 7.0; Trident/3.1; IEMobile/7.0;  ; LEO70)",
    (
        "Mozilla/5.0 (DirectFB; U; Linux armv5tejl; c) AppleWebKit/531.2+ (KHTML, like "
        "Gecko) Safari/531.2+ HbbTV/1.1.1 (;RT-RK;TV;1.0;1.0;),gzip(gfe),gzip(gfe),gzip(gfe)"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; TAGIMID140 Build/IMM76D) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.166  Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; en-US; MI 1SC Build/IMM76D) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.166 Mobile Safari/535.19"
    ),
    (
        "ERO247 Android Application (16, ero247 v2.2.2) - asus PadFone 2 asus - "
        "FFFFFFFF-EC21-B7A0-FFFF-FFFF974AE5BA"
    ),
    "Mozilla/4.0 (compatible; MSIE 7.0; Windows Phone OS 7.5; Trident/3.1; IEMobile/7.0; Xbox)",
    (
        "ERO247 Android Application (16, ero247 v2.2.2) - TCT ALCATEL ONE TOUCH 991T TCT - "
        "FFFFFFFF-EF1A-BDD0-FFFF-FFFF99CFD235"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; MyPhone A848 Duo Build/IMM76D) "
        "AppleWebKit/535.19 (KHTML, like Gecko) Chrome/18.0.1025.133 Mobile Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 2.2.2; En-us; WellcoM-A800 Build/FRG83G) "
        "AppleWebKit/533.1 (KHTML, Like Gecko) Version/4.0 Mobile Safari/533.1"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.0.4; ru-ru; ENOT J240 Build/IMM76D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Safari/534.30"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.2.1; INSIGNIA 5 Build/JOP40D) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/34.0.1847.114 Mobile Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; NABI2-NV7A Build/IMM76D) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.166 Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.1.1; PAD-FMD700HD Build/JRO03C) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.166  Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.0.3; de-de; lg-p700 Build/IML74K) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Mobile Safari/534.30"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; BB EH7 Build/IMM76D) AppleWebKit/535.19 (KHTML, "
        "like Gecko) Chrome/18.0.1025.166 Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; Novo7 ELF Build/IMM76D) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/28.0.1500.64 Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; Multilaser Titanium Build/IMM76D) "
        "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/27.0.1453.90 Mobile Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.1.1; @TAB-NINE-X2-B Build/JRO03H) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/28.0.1500.63 Safari/537.36 OPR/15.0.1162.61541"
    ),
    (
        "VMVID Android Application (13, vmvid v2.1) - alps GT-N7102 samsung - "
        "00000000-2D04-A521-9D0B-840A04C6DBDF"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.2.2; WX10K Build/103.0.2f30) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/34.0.1847.114 Mobile Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.2.1; Cynus T5 Build/JOP40D) AppleWebKit/537.31 "
        "(KHTML, like Gecko) Chrome/26.0.1410.58 Mobile Safari/537.31"
    ),
    (
        "Mozilla/5.0 (compatible; MSIE 9.0; Windows Phone OS 7.5; Trident/5.0; IEMobile/9.0; "
        "nokia; lumia 900)"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 2.3.3; en-us; Android for Telechips TCC9300 "
        "Evaluation Board Build/GRI40) AppleWebKit/533.1 (KHTML, like Gecko) Version/4.0 "
        "Mobile Safari/533.1"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.0.4; de-de; AT-AS40SE Build/IMM76D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Mobile Safari/534.30"
    ),
    "BIRD S230_CMCC/1.00 Nucleus RTOS/V1.11.19 MTK6223/07A Release/07.28.2007 Browser/Teleca",
    (
        "Mozilla/5.0 (Mobile; LYF/F300B/LYF-F300B-001-01-34-070519; Android; rv:48.0) "
        "Gecko/48.0 Firefox/48.0 KAIOS/2.5"
    ),
    (
        "Mozilla/4.0 (compatible; MSIE 7.0; Windows Phone OS 7.0; Trident/3.1; IEMobile/7.0; "
        "HTC; Radar 4G)"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.0.4; B-Tab 711 Build/IMM76D) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/27.0.1453.90 Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.1.1; PAD1002 Build/JRO03H) AppleWebKit/537.36 (KHTML, "
        "like Gecko) Chrome/29.0.1547.72 Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.1.2; CINK PEAX 2 Build/JZO54K) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/28.0.1500.94 Mobile Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.0.9; de-de; X12 Build/IMM76D) AppleWebKit/534.30 "
        "(KHTML, like Gecko) Version/4.0 Mobile Safari/534.30"
    ),
    (
        "Mozilla/5.0 (compatible; MSIE 10.0; Windows Phone 8.0; Trident/6.0; IEMobile/10.0; "
        "ARM; Touch; Juggernaut; 0)"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.2.2; HP 8 Build/1.0.7_WW-FIR-13) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/28.0.1500.94 Safari/537.36"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.2.2; en-; Cubot One by bigrammy Build/JOP40D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Mobile Safari/534.30"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 1.6; de-de; Garminfone Build/DRC79) "
        "AppleWebKit/528.5+ (KHTML, like Gecko) Version/3.1.2 Mobile Safari/525.20.1; "
        "A50-V4.0.25-user-20100722"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.1.2; C6833 Build/6.2.A.1.100) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Chrome/28.0.1500.63 Mobile Safari/537.36 OPR/15.0.1162.61541"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.1.2; Infinix X530 Build/JZO54K) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Chrome/18.0.1025.166 Mobile Safari/535.19"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.2.2; de-de; ZP780 Build/JDQ39) AppleWebKit/534.30 "
        "(KHTML, like Gecko) Version/4.0 Mobile Safari/534.30"
    ),
    (
        "ERO247 Android Application (13, ero247 v2.1) - MEDION MEDION LIFE P4310 MEDION - "
        "FFFFFFFF-E336-39BE-FFFF-FFFF84D97A71"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 2.1-update1-1.0.0; ar-eg; POV Mobii 7 Build/ECLAIR) "
        "AppleWebKit/530.17 (KHTML, like Gecko) Version/4.0 Mobile Safari/530.17"
    ),
    (
        "Mozilla/4.0 (compatible; MSIE 7.0; Windows Phone OS 7.0; Trident/3.1; IEMobile/7.0) "
        "AdMob;Octagon"
    ),
    "MOT-ROKR-E1",
    (
        "SV1 Android Application (13, sv1 v2.1) - YIFANG POM727MC MID - "
        "FFFFFFFF-FC86-1B92-1BCE-54530033C587"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.2.2; LIFETAB_E10316 Build/JDQ39) AppleWebKit/537.31 "
        "(KHTML, like Gecko) Chrome/26.0.1410.58 Safari/537.31"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.0.4; de-de; Informer 921 Build/IMM76D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Safari/534.30"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.2.1; de-de; SK-Mtek GT7305 Build/JOP40D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Safari/534.30"
    ),
    (
        "Mozilla/5.0 (Linux; Android 4.1.1; ATP7717 Build/JRO03H) AppleWebKit/537.36 (KHTML, "
        "like Gecko) Chrome/31.0.1650.57 Safari/537.36 OPR/18.0.1290.67495"
    ),
    "Mozilla/3.0 (Planetweb/2.100 JS SSL US; Dreamcast US)",
    (
        "Mozilla/5.0 (Symbian/3; Series60/5.2 NokiaN8-00/013.016; Profile/MIDP-2.1 "
        "Configuration/CLDC-1.1 ) AppleWebKit/525 (KHTML, like Gecko) Version/3.0 "
        "BrowserNG/7.2.8.10 3gpp-gba"
    ),
    (
        "Mozilla/5.0 (X11; U; BSD Four; en-US) AppleWebKit/533.3 (KHTML, like Gecko) rekonq "
        "Safari/533.3"
    ),
    "HbbTV/1.1.1 (;;;;;) firetv-firefox-plugin 1.1.20",
    (
        "Mozilla/5.0 (X11; U; Linux i686; nl-NL) AppleWebKit/534.3 (KHTML, like Gecko) "
        "WeTab-Browser Safari/534.3"
    ),
    (
        "Mozilla/5.0 (BlackBerry; U; BlackBerry 9800; en-GB) AppleWebKit/534.1+ (KHTML, like "
        "Gecko) Version/6.0.0.141 Mobile Safari/534.1+"
    ),
    (
        "Mozilla/5.0 (Macintosh; U; Intel Mac OS X 10_5_7; en-us) AppleWebKit/530.17 (KHTML, "
        "like Gecko) Version/4.0 Safari/530.17 Skyfire/2.0"
    ),
    (
        "Mozilla/5.0 (X11; Linux aarch64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/52.0.2743.84 Safari/537.36 CrKey/1.22.74257"
    ),
    (
        "Mozilla/5.0 (Web0S; Linux/SmartTV) AppleWebKit/537.41 (KHTML, like Gecko) Large "
        "Screen WebAppManager Safari/537.41"
    ),
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Roku/DVP-5.0 (025.00E08043A)",
    "Mozilla/5.0 (X11; U; SunOS i86pc; en-US; rv:1.8.0.5) Gecko/20060728 Firefox/1.5.0.5",
    "App/1.0.0 CFNetwork/1206 Darwin/20.1.0",
    (
        "Mozilla/4.0 (compatible; MSIE 6.0; Windows CE; IEMobile 7.11) 320x240; VZW; "
        "Motorola-A4500; Windows Mobile 6.1 Standard"
    ),
    (
        "Mozilla/5.0 (X11; U; Linux x86_64; en-US; rv:1.8.1.13) Gecko/20080208 "
        "Mandriva/2.0.0.13-1mdv2008.1 (2008.1) Firefox/2.0.0.13"
    ),
    (
        "Mozilla/5.0 (X11; Linux armv7l) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/90.0.4430.225 Safari/537.36 CrKey/1.56.500000 DeviceType/SmartSpeaker"
    ),
    (
        "Mozilla/5.0 (Series30Plus; Nokia220/10.03.11; Profile/Series30Plus "
        "Configuration/Series30Plus) Gecko/20100401 S40OviBrowser/3.8.1.0.5"
    ),
    (
        "Mozilla/5.0 (SymbianOS/9.4; U; Series60/5.0 Nokia5800d-1/21.0.025; Profile/MIDP-2.1 "
        "Configuration/CLDC-1.1 ) AppleWebKit/413 (KHTML, like Gecko) Safari/413"
    ),
    (
        "Mozilla/5.0 (MeeGo; NokiaN9) AppleWebKit/534.13 (KHTML, like Gecko) "
        "NokiaBrowser/8.5.0 Mobile Safari/534.13"
    ),
    (
        "Mozilla/5.0 (Series40; NokiaC2-03/07.48; Profile/MIDP-2.1 Configuration/CLDC-1.1) "
        "Gecko/20100401 S40OviBrowser/2.2.0.0.33"
    ),
    "Mozilla/5.0 (OpenBSD 3.3 i386; U) Opera 6.03  [en]",
    "Opera/9.80 (BREW; Opera Mini/5.1.191/27.2202; U; en) Presto/2.8.119 240X400 LG VN271",
    (
        "Mozilla/5.0 (Linux; U; Android 4.0.3; en-us; KFTT Build/IML74K) AppleWebKit/534.30 "
        "(KHTML, like Gecko) Version/4.0 Safari/534.30"
    ),
    "Mozilla/4.0 (compatible; MSIE 8.0; Linux armv7l; Maemo; Opera Mobi/9; es-ES) Opera 11.00",
    "acer_S200 Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1; Windows Phone 6.5)",
    (
        "Mozilla/5.0 (Linux; U; Sailfish 3.0; Mobile; rv:45.0) Gecko/45.0 Firefox/45.0 "
        "SailfishBrowser/1.0"
    ),
    "HbbTV/1.1.1 (;Samsung;SmartTV2012;;;) WebKit",
    "Mozilla/4.0 (compatible; Linux 2.6.10) NetFront/3.3 Kindle/1.0 (screen 600x800)",
    (
        "Mozilla/5.0 (Unknown; Linux armv7l) AppleWebKit/537.1+ (KHTML, like Gecko) "
        "Safari/537.1+ HbbTV/1.1.1 ( ;LGE ;NetCast 4.0 ;03.20.30 ;1.0M ;)"
    ),
    (
        "Mozilla/5.0 (SMART-TV; Linux; Tizen 2.3) AppleWebkit/538.1 (KHTML, like Gecko) "
        "SamsungBrowser/1.0 TV Safari/538.1"
    ),
    "Mozilla/4.0 WebTV/2.6 (compatible; MSIE 4.0)",
    "Viafree-tvOS-DK/3.7.1 (com.MTGx.ViaFree.dk; build:7341; tvOS 12.1.0) Alamofire/4.7.0",
    (
        "Mozilla/5.0 (X11; U; Linux i686; en-US; rv:1.9.1.16) Gecko/20110302 Conkeror/0.9.2 "
        "(Debian-0.9.2+git100804-1)"
    ),
    (
        "Mozilla/5.0 (Windows; U; Windows NT 6.1; en-US; rv:1.9.2.17) Gecko/20110414 "
        "Thunderbird/3.1.10 ThunderBrowse/3.3.5"
    ),
    "Mozilla/5.0 (Linux 2.4.20-gentoo-r5 i686; U) Opera 7.11  [en]",
    (
        "Mozilla/5.0 (Linux; Android 12.0; Build/STTL.240206.002) AppleWebKit/537.36 (KHTML, "
        "like Gecko) Chrome/92.0.4515.0 Safari/537.36 CrKey/1.56.500000 DeviceType/AndroidTV"
    ),
    "(null)/(null) watchOS/5.1.1 model/Watch3,3 hwp/t8004 build/16R600 (6; dt:155)",
    "Mozilla/4.0 (Brew MP 1.0.2; U; en-us; Sanyo; NetFront/3.5.1/AMB) Sprint E4100",
    "Mozilla/4.61 [en] (X11; U; FreeBSD 4.9-RC i386)",
    (
        "Mozilla/5.0 (webOS/1.2; U; en-US) AppleWebKit/525.27.1 (KHTML, like Gecko) "
        "Version/1.0 Safari/525.27.1 Desktop/1.0"
    ),
    (
        "Mozilla/5.0 (PlayBook; U; RIM Tablet OS 1.0.0; en-US) AppleWebKit/534.8+ (KHTML, "
        "like Gecko) Version/0.0.1 Safari/534.8+"
    ),
    "Mozilla/5.0 (compatible; Peew/1.0; http://www.peew.de/crawler/)",
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
        "like Gecko) Mobile/15E148 Safari/604.1 KAKAOTALK/11.3.1 (PFINAPP)"
    ),
    (
        "Mozilla/5.0 (Linux; U; Android 4.2.1; en-gb; CUBOT ONE Build/JOP40D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Version/4.0 Mobile Safari/534.30"
    ),
    "CyberPatrol SiteCat Webbot (http://www.cyberpatrol.com/cyberpatrolcrawler.asp)",
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/137.0.0.0 Safari/537.36 Viewer/99.9.8865.88"
    ),
    "lb-spider",
    "DomainsDB.net MetaCrawler v.0.9.7b (http://domainsdb.net/)",
    "Research spider - ak1835@albany.edu",
    "Mozilla/5.0 (X11; Linux i686 (x86_64); rv:2.0b4) Gecko/20100818 Firefox/4.0b4",
    "Reaper/1.3.6 (Linux; U; Android 4.3; de-DE; GT-I9300 Build/JSS15J)",
    "QuickFinder Crawler",
    (
        "Orgbybot/OrgbyBot v1.2 (Spidering the net for Orgby; http://www.orgby.com/  ; "
        "Orgby.com Search Engine)"
    ),
    (
        "Mozilla/5.0 (Linux; Android 7.0; SM-A520F Build/NRD90M; wv) AppleWebKit/537.36 "
        "(KHTML, like Gecko) Version/4.0 Chrome/58.0.3029.83 Mobile Safari/537.36 "
        "Flipboard-Briefing/2.7.28"
    ),
    "aws-sdk-nodejs/2.141.0 win32/v8.4.0",
    "Cyberduck/6.3.0.27105 (Windows 10/10.0) (x86)",
    "spiderpig/0.1,gzip(gfe),gzip(gfe)",
    "CrawlerBoy Pinpoint.com",
    "Mozilla/4.0 (compatible; SpeedySpider; www.entireweb.com)",
    "Mozilla/5.0 (compatible; loc-crawl/1.10.1 +http://www.google.com)",
    (
        "LG-C1500 UP.Browser/6.2.3 (GUI) MMP/1.0 (compatible;YahooSeeker/M1A1-R2D2; "
        "http://help.yahoo.com/help/us/ysearch/crawling/crawling-01.html)"
    ),
    "Mozilla/5.0 (compatible; Linux i686; en-US; URLfilterDB-crawler/1.0) ufdb/1.0",
    "VSE/1.0 (vsecrawler@hotmail.com)",
    "OmniExplorer_Bot/6.70 ( http://www.omni-explorer.com) WorldIndexer",
    "Mozilla/4.0 (compatible: AstraSpider V.2.1 : astrafind.com)",
    "Mozilla/4.0 (CMS Crawler: http://www.cmscrawler.com)",
    (
        "Mozilla/5.0 (Linux; U; Android 4.1.1; en-us; Nexus 7 Build/JRO03D) "
        "AppleWebKit/534.30 (KHTML, like Gecko) Dolphin/INT-1.0.4 Mobile Safari/534.30"
    ),
    "Sogou develop spider/4.0( http://www.sogou.com/docs/help/webmasters.htm#07)",
    (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/144.0.7559.109 Safari/537.36 OPX/3.1"
    ),
    "TinEye-bot/0.02 (see http://www.tineye.com/crawler.html)",
    "SheenBot/SheenBot-1.0.4 (Sheen web crawler)",
    "aws-sdk-go/1.4.12 (go1.6; linux; amd64) S3Manager",
    "CrawlWave/1.2 (crawlwave[at]circular.gr http://www.spiderwave.aueb.gr/",
    "CC Metadata Scaper http://wiki.creativecommons.org/Metadata_Scraper",
    "Mozilla/4.0 (compatible; SpiderView 1.0;unix)",
    "Mozilla/5.0 (compatible; Yahoo! Slurp China; http://misc.yahoo.com.cn/help.html)",
    "BebopBot/2.5.1 (compatible; media crawler V1;  http://www.apassion4jazz.net/bebopbot.html;)",
    "RavenCrawler",
    "Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.0; WordSurfer Spider 2.2;))",
    "IWE Spider v.01 - www.pavka.com.au",
    "Mozilla/5.0 (compatible; FatBot 2.0; http://www.thefind.com/crawler)",
)


_ANDROID_PHONES: Final = ("Pixel 7", "SM-S918B", "SM-A546B", "M2101K6G", "CPH2451", "moto g(60)")
_ANDROID_TABLETS: Final = ("SM-X200", "SM-T870", "Lenovo TB-X606F", "Nexus 10", "KFMAWI", "Pixel C")


def generated() -> list[str]:
    """Real templates with their versions and models varied, as a busy site sees them."""
    agents: list[str] = []
    for i in range(12):
        chrome = f"Chrome/{110 + i}.0.{5400 + 37 * i}.{i * 7}"
        for model in _ANDROID_PHONES + _ANDROID_TABLETS:
            agents.append(
                f"Mozilla/5.0 (Linux; Android {9 + i % 6}; {model}) AppleWebKit/537.36 "
                f"(KHTML, like Gecko) {chrome} {'Mobile ' if model in _ANDROID_PHONES else ''}"
                "Safari/537.36"
            )
        for device in ("iPhone; CPU iPhone OS", "iPad; CPU OS", "iPod touch; CPU iPhone OS"):
            agents.append(
                f"Mozilla/5.0 ({device} {14 + i % 5}_{i % 4} like Mac OS X) {SAFARI_IOS} "
                f"Version/{14 + i % 5}.{i % 4} Mobile/15E148 Safari/604.1"
            )
        for desktop in (
            "Windows NT 10.0; Win64; x64",
            "Windows NT 6.1; WOW64",
            "Macintosh; Intel Mac OS X 10_15_7",
            "X11; Linux x86_64",
            "X11; CrOS x86_64 14541.0.0",
        ):
            agents.append(
                f"Mozilla/5.0 ({desktop}) AppleWebKit/537.36 (KHTML, like Gecko) {chrome}"
            )
            agents.append(
                f"Mozilla/5.0 ({desktop}; rv:{100 + i}.0) Gecko/20100101 Firefox/{100 + i}.0"
            )
    return agents


#: Real crawlers whose bot keyword comes after the 100th character: user-agents' rule
#: ``^.{0,100}(bot|...)`` does not see it, and neither do we (same verdict, same rule).
#: ua-parser-rs alone would call them bots, and with them real browsers that carry such a
#: word late ("Abbott", "Daum"): _device re-reads its "Spider" verdicts with Python's re.
LATE_BOT_KEYWORD: Final[dict[str, tuple[str, Classification, Classification]]] = {
    "applebot": (
        f"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) {SAFARI_IOS} Version/13.1.1 "
        "Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)",
        ("desktop", False),
        ("desktop", True),
    ),
    "msie-crawler": (
        "Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1; Roadrunner; .NET CLR 1.0.3705; "
        ".NET CLR 1.1.4322; MSIECrawler)",
        ("desktop", False),
        ("desktop", True),
    ),
    "ssl-crawler": (
        "Mozilla/5.0 (X11; Linux i686) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/30.0.1599.101 Safari/537.36; SSL-Crawler: http://crawler.dcsec.uni-hannover.de",
        ("desktop", False),
        ("desktop", True),
    ),
    "pingdom": (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Ubuntu "
        "Chromium/61.0.3163.100 Chrome/61.0.3163.100 Safari/537.36 PingdomPageSpeed/1.0 "
        "(pingbot/2.0; +http://www.pingdom.com/)",
        ("desktop", False),
        ("desktop", True),
    ),
}

#: Where ua-parser-rs and user-agents part ways, on purpose: (agent, user-agents' verdict, ours).
#: The pure-Python resolver agrees with user-agents on all of them (see
#: test_python_resolver_matches_user_agents_everywhere), so the rules mirrored in _device are
#: not the cause.
DIFFERENT_ON_PURPOSE: Final[dict[str, tuple[str, Classification, Classification]]] = {
    # ua-parser-rs reads \w and \d as ASCII; Python's re also takes "²" or "é".
    # Headers are ASCII in practice (and latin-1 at worst), so only junk like this moves.
    "superscript-model": ("LG-T²500", ("mobile", False), (None, False)),
    # Rust strings are UTF-8: a lone surrogate cannot reach ua-parser-rs, so no verdict.
    # Headers decoded as latin-1 (ASGI and WSGI alike) never hold one.
    "lone-surrogate": (
        f"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) \ud800 {SAFARI_IOS}",
        ("mobile", False),
        (None, False),
    ),
}


def _mismatches(
    agents: list[str] | tuple[str, ...],
) -> list[tuple[str, Classification, Classification]]:
    """Every agent that _device classifies differently from user-agents, with both verdicts."""
    found = []
    for ua in agents:
        ours, theirs = classify_user_agent(ua), reference(ua)
        if ours != theirs:
            found.append((ua, ours, theirs))
    return found


def _everything() -> list[str]:
    return [ua for ua, _ in CORPUS.values()] + list(UAP_CORE_SAMPLE) + generated()


# ---------------------------------------------------------------------------
# The fast path
# ---------------------------------------------------------------------------


def test_the_rust_resolver_is_the_one_in_use() -> None:
    # ua-parser-rs is a dependency: without it every new agent costs ~1 ms again.
    assert backend() == "ua-parser-rs"


#: Real browsers whose agent carries a bot keyword of uap-core's catch-all rule past the
#: 100th character (an app's own token, a company name): people, not bots.
LATE_KEYWORD_BROWSERS: Final = [
    f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    f"Chrome/126.0.0.0 Safari/537.36 {token}"
    for token in ("AbbottIntranet/2.1", "DaumApps/4.0", "WordPress.com/12", "YahooMobile/1.0")
]


@pytest.mark.parametrize("user_agent", LATE_KEYWORD_BROWSERS)
def test_a_late_keyword_does_not_make_a_browser_a_bot(user_agent: str) -> None:
    assert user_agent.rindex(" ") + 1 > 100  # where the token starts
    assert reference(user_agent) == ("desktop", False)
    assert classify_user_agent(user_agent) == ("desktop", False)


def test_the_worker_gets_its_share_while_the_request_thread_is_busy() -> None:
    # An engine that releases the GIL inside each match (google-re2 does) waits a whole
    # switch interval to get it back while the app's thread is busy: it classified 188
    # agents in a second here, and the worker fell behind any real load.
    classify_user_agent(CORPUS["iphone-safari"][0])  # the engine is built
    done = []
    stop = threading.Event()

    def worker() -> None:
        n = 0
        while not stop.is_set():
            classify_user_agent(f"Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/{n}.0")
            n += 1
        done.append(n)

    thread = threading.Thread(target=worker)
    thread.start()
    deadline = time.monotonic() + 1.0
    spins = 0
    while time.monotonic() < deadline:  # a busy request thread: pure Python, no I/O
        spins += 1
    stop.set()
    thread.join()
    assert done[0] > 2_000, done


@pytest.mark.parametrize(
    ("user_agent", "theirs"),
    [(ua, theirs) for ua, theirs, _ in LATE_BOT_KEYWORD.values()],
    ids=list(LATE_BOT_KEYWORD),
)
def test_a_late_bot_keyword_is_read_as_user_agents_reads_it(
    user_agent: str, theirs: Classification
) -> None:
    assert reference(user_agent) == theirs == ("desktop", False)
    assert classify_user_agent(user_agent) == theirs


@pytest.mark.parametrize(("user_agent", "expected"), list(CORPUS.values()), ids=list(CORPUS))
def test_corpus(user_agent: str, expected: Classification) -> None:
    assert reference(user_agent) == expected
    assert classify_user_agent(user_agent) == expected


def test_uap_core_sample_matches_user_agents() -> None:
    assert _mismatches(UAP_CORE_SAMPLE) == []


def test_generated_agents_match_user_agents() -> None:
    agents = generated()
    assert len(set(agents)) == len(agents) == 300
    assert _mismatches(agents) == []
    # The variety is real: all three classes come out of it.
    assert {classify_user_agent(ua)[0] for ua in agents} == {"mobile", "tablet", "desktop"}


@pytest.mark.parametrize(
    ("user_agent", "theirs", "ours"),
    list(DIFFERENT_ON_PURPOSE.values()),
    ids=list(DIFFERENT_ON_PURPOSE),
)
def test_different_on_purpose(
    user_agent: str, theirs: Classification, ours: Classification
) -> None:
    assert reference(user_agent) == theirs
    assert classify_user_agent(user_agent) == ours


def test_the_mirrored_rules_read_the_windows_version() -> None:
    # The only rules that read an OS version: Windows RT is a tablet, Windows ME a PC.
    assert _device._from_families("x", "IE", "Windows", ("RT", None, None), "Other") == (
        "tablet",
        False,
    )
    assert _device._from_families("x", "IE", "Windows", ("ME", None, None), "Other") == (
        "desktop",
        False,
    )
    assert _device._from_families("x", "IE", "Windows", ("7", None, None), "Other") == (None, False)
    # parse_version's int(): "08" is "8", and patch_minor never counts.
    assert _device._version_string(("08", "1", None)) == "8.1"
    assert _device._version_string(("10", None, "3")) == "10.3"


# ---------------------------------------------------------------------------
# Fallbacks
# ---------------------------------------------------------------------------


def test_python_resolver_matches_user_agents_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    _block(monkeypatch, "ua_parser_rs", "ua_parser.regex")
    _rebuild(monkeypatch)
    assert backend() == "ua-parser"
    agents = _everything() + [ua for ua, _, _ in DIFFERENT_ON_PURPOSE.values()]
    assert _mismatches(agents) == []


def test_a_resolver_that_fails_to_build_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    import ua_parser.regex

    def broken(self: object, matchers: object) -> None:
        raise ValueError("regex parse error")  # what a rule new to ua-parser-rs would do

    monkeypatch.setattr(ua_parser.regex.Resolver, "__init__", broken)
    _rebuild(monkeypatch)
    assert backend() == "ua-parser"
    assert classify_user_agent(CORPUS["iphone-safari"][0]) == ("mobile", False)
    assert classify_user_agent(CORPUS["googlebot"][0]) == (None, True)


def test_user_agents_is_the_last_resort(monkeypatch: pytest.MonkeyPatch) -> None:
    # As without ua-parser 1.0 (user-agents itself accepts ua-parser 0.10).
    _block(monkeypatch, "ua_parser")
    _rebuild(monkeypatch)
    assert backend() == "user-agents"
    agents = [ua for ua, _ in CORPUS.values()] + [ua for ua, _, _ in DIFFERENT_ON_PURPOSE.values()]
    assert _mismatches(agents) == []


def test_parser_errors_give_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    from ua_parser import Domain, PartialResult

    def explode(ua: str, domains: Domain) -> PartialResult:
        raise RuntimeError("resolver bug")

    engine = functools.partial(_device._with_resolver, explode, Domain.ALL)
    monkeypatch.setattr(_device, "_engine", ("exploding", engine))
    assert classify_user_agent(CORPUS["firefox-ubuntu"][0]) == (None, False)
    assert classify_user_agent(CORPUS["googlebot"][0]) == (None, False)


def test_the_engine_is_built_once_under_contention(monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[int] = []

    def slow_build() -> tuple[str, object]:
        builds.append(1)
        time.sleep(0.05)  # long enough for every thread to arrive while it runs
        return "test", lambda ua: ("desktop", False)

    monkeypatch.setattr(_device, "_build", slow_build)
    _rebuild(monkeypatch)
    start = threading.Barrier(8)
    seen: list[str] = []

    def worker() -> None:
        start.wait()
        seen.append(backend())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert builds == [1]
    assert seen == ["test"] * 8


# ---------------------------------------------------------------------------
# Contract: cache, cap, totality, import cost
# ---------------------------------------------------------------------------


def test_facts_reexports_this_module() -> None:
    assert _facts.classify_user_agent is classify_user_agent
    assert _facts._classify is _device._classify
    assert _device._MAX_USER_AGENT == _facts._MAX_USER_AGENT == 512


def test_the_cache_is_bounded_and_keyed_on_the_capped_agent() -> None:
    base = CORPUS["chrome-windows"][0] + " " + "x" * 600
    assert classify_user_agent(base + "a") == classify_user_agent(base + "b") == ("desktop", False)
    assert _device._classify.cache_info().currsize == 1
    assert _device._classify.cache_info().maxsize == 4096
    # Blank agents never reach the parser nor the cache.
    assert classify_user_agent("") == classify_user_agent(" \t\r\n") == (None, False)
    assert _device._classify.cache_info().currsize == 1


HOSTILE: Final = (
    "Mozilla/5.0 (" * 50_000,
    "(" * 100_000 + ")" * 100_000,
    "Mozilla/5.0 (Linux; Android " + "1." * 50_000 + "; SM-X200)",
    "a" * 1_000_000 + "Googlebot",
    "".join(map(chr, range(256))) * 10,
    "\x00" * 4096,
    "\ud800\udfff" * 1000,
    "\U0001f600 " * 1000,
    "\u202e\u200b\ufeff" * 500,
    "%s%n%x" * 500,
)


@pytest.mark.parametrize("user_agent", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_agents_never_raise(user_agent: str) -> None:
    device, is_bot = classify_user_agent(user_agent)
    assert device in (None, "mobile", "tablet", "desktop")
    assert isinstance(is_bot, bool)
    if not any("\ud800" <= char <= "\udfff" for char in user_agent):  # see "lone-surrogate"
        assert (device, is_bot) == reference(user_agent)


def test_importing_the_package_loads_no_parser() -> None:
    code = (
        "import sys, agentsight_middleware, agentsight_middleware._facts as f\n"
        "heavy = ('ua_parser', 'ua_parser_rs', 'user_agents')\n"
        "assert not [m for m in heavy if m in sys.modules], 'a parser was imported eagerly'\n"
        "assert f.classify_user_agent('curl/8.5.0') == (None, False)\n"
        "assert 'ua_parser_rs' in sys.modules\n"
        "assert 'user_agents' not in sys.modules, 'the fast path needs no user_agents'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_importing_the_package_loads_no_event_loop_http_or_database_module() -> None:
    # What the README promises for start-up time: these load when first needed, in the
    # worker (a thread started by the first event), not when an app imports us.
    code = (
        "import sys, agentsight_middleware\n"
        "from agentsight_middleware import AgentSightMiddleware, AgentSightWSGIMiddleware\n"
        "import agentsight_middleware._delivery, agentsight_middleware._park\n"
        "late = ('asyncio', 'httpx', 'httptools', 'h11', 'sqlite3')\n"
        "loaded = [m for m in late if m in sys.modules]\n"
        "assert not loaded, f'imported eagerly: {loaded}'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# -- the Spider re-check: bounded ------------------------------------------------------

GOOGLEBOT_UA = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
WIDENED_IPHONE = "x" * 150 + " iPhone bot/1"  # ua-parser-rs: Spider; user-agents: an iPhone
CRAFTED = "123456" + ";" * 500 + "bot"  # once ~6.5 ms in the worker, for every such agent


def _spider_check(budget: float = _device.SPIDER_CHECK_BUDGET) -> Any:
    from ua_parser import load_lazy_builtins
    from ua_parser.regex import Resolver as RustResolver

    return _device._SpiderCheck(load_lazy_builtins(), RustResolver, budget)


def test_a_catch_all_verdict_is_checked_without_the_full_rule_set() -> None:
    # The catch-all answered in ua-parser-rs: every rule before it failed there, so only
    # the leading Spider rules and the rules from the catch-all on are run in Python.
    from ua_parser import Domain, load_lazy_builtins
    from ua_parser.regex import Resolver as RustResolver

    check = _spider_check()
    rust = RustResolver(load_lazy_builtins())

    def no_full_check(*args: Any) -> Any:
        raise AssertionError("the full rule set ran")

    check._full = no_full_check
    for ua in (GOOGLEBOT_UA, CRAFTED, "Mozilla/5.0 (X11; Linux) " + "a" * 120 + " WordPress/6"):
        device = rust(ua, Domain.ALL).device
        assert device is not None
        assert device.family == "Spider"
        expected = reference(ua)[1]
        assert (check(ua) == "Spider") is expected, ua


def test_a_full_check_runs_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from ua_parser import Domain, load_lazy_builtins
    from ua_parser.regex import Resolver as RustResolver

    rust = RustResolver(load_lazy_builtins())
    device = rust(WIDENED_IPHONE, Domain.ALL).device
    assert device is not None
    assert (device.family, device.model) == ("Spider", "Smartphone")  # a widened leading rule
    assert reference(WIDENED_IPHONE) == ("mobile", False)
    assert _spider_check()(WIDENED_IPHONE) == "iPhone"
    # Spent (a flood of such agents): ua-parser-rs's verdict stands, at no cost.
    assert _spider_check(budget=0.0)(WIDENED_IPHONE) == "Spider"


_PAD = " (" + "; ".join(["en-us"] * 30) + ")"


@pytest.mark.parametrize(
    "ua",
    [
        CRAFTED,
        WIDENED_IPHONE,
        # A PetalBot token past 200 chars: ua-parser-rs's widened rule 5 answers "Spider"
        # with the catch-all's model; user-agents reads the device rules after it.
        "Mozilla/5.0 (PlayStation Vita 3.61) AppleWebKit/537.73 (KHTML, like Gecko) Silk/3.2"
        + _PAD
        + " PetalBot",
        "Mozilla/5.0 (Linux; U; Android 4.0.3; en-us; KFTT Build/IML74K) AppleWebKit/535.19 "
        "(KHTML, like Gecko) Silk/3.4 Safari/535.19 Silk-Accelerated=true" + _PAD + " PetalBot",
        "Mozilla/5.0 (PlayBook; U; RIM Tablet OS 2.1.0; en-US) AppleWebKit/536.2+ (KHTML, like "
        "Gecko) Version/7.2.1.0 Safari/536.2+" + _PAD + " AspiegelBot",
    ],
    ids=["crafted", "widened-iphone", "vita-petalbot", "kindle-petalbot", "playbook-aspiegel"],
)
def test_a_spider_verdict_agrees_with_user_agents(ua: str) -> None:
    assert classify_user_agent(ua) == reference(ua)


def test_a_fork_while_another_thread_builds_the_parser_does_not_hang_the_child() -> None:
    NEW_AGENT = (  # one not classified yet in this process (the answers are cached)
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.9999.1 Safari/537.36"
    )
    # The worker builds the parser at its first events (~0.3 s, under a lock); a fork then
    # (an app forking a helper, a server forking late) left the child's copy of the lock
    # held for ever, by a thread the child does not have: the child's first user agent
    # waited on it for good (its worker stuck, every event queued behind).
    built = _device._engine
    _device._engine = None  # not built yet: the child builds it
    _device._lock.acquire()  # as the building thread holds it at the fork
    try:
        told = in_forked_child(lambda: str(classify_user_agent(NEW_AGENT)).encode())
    finally:
        _device._lock.release()
        _device._engine = built
    assert told == b"('desktop', False)"
