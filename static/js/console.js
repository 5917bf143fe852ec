// lazycat console: small behaviours htmx does not cover. No inline script anywhere (CSP).
(function () {
  "use strict";

  // "3 min ago" for every <time class="ago">, kept fresh: pushed fragments carry absolute times.
  function ago(seconds) {
    if (seconds < 5) return "just now";
    if (seconds < 60) return Math.floor(seconds) + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }
  function refreshTimes() {
    var now = Date.now();
    document.querySelectorAll("time.ago[datetime]").forEach(function (el) {
      var t = Date.parse(el.getAttribute("datetime"));
      if (!isNaN(t)) el.textContent = ago(Math.max(0, (now - t) / 1000));
    });
  }

  // The pairing code's countdown.
  function refreshCountdown() {
    var el = document.getElementById("countdown");
    if (!el) return;
    var left = Math.round(Number(el.dataset.expires) - Date.now() / 1000);
    if (left <= 0) {
      el.textContent = "expired";
      var box = document.getElementById("pairing");
      if (box) box.classList.add("expired");
      var note = document.getElementById("expired-note");
      if (note) note.hidden = false;
      return;
    }
    el.textContent = Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0");
  }

  function tick() { refreshTimes(); refreshCountdown(); }

  document.addEventListener("DOMContentLoaded", function () {
    tick();
    setInterval(tick, 1000);
  });
  document.addEventListener("htmx:afterSettle", refreshTimes);

  // A pushed row for a device that just joined the list (approved): append it to a list page.
  // Rows of devices on other pages are not this page's business and are dropped.
  document.addEventListener("htmx:oobErrorNoTarget", function (ev) {
    var el = ev.detail && ev.detail.content;
    var rows = document.getElementById("device-rows");
    if (!el || !rows || !el.classList || !el.classList.contains("device-row")) return;
    if (el.dataset.fresh !== "true" || rows.dataset.appendNew !== "true") return;
    el.removeAttribute("hx-swap-oob");
    var empty = rows.querySelector("td.empty");
    if (empty) empty.parentNode.remove();
    rows.appendChild(el);
    htmx.process(el);
    refreshTimes();
  });

  // Say when live updates stop, and catch up on what was missed when they come back.
  var wasClosed = false;
  document.addEventListener("htmx:wsClose", function () {
    wasClosed = true;
    window.__lazycatLive = false;
    var s = document.getElementById("live-status");
    if (s) s.hidden = false;
  });
  document.addEventListener("htmx:wsOpen", function () {
    window.__lazycatLive = true; // the browser tests wait for this before they act
    var s = document.getElementById("live-status");
    if (s) s.hidden = true;
    if (wasClosed) {
      wasClosed = false;
      htmx.ajax("GET", window.location.href, { target: "main", select: "main", swap: "outerHTML" });
    }
  });

  // Confirm destructive buttons that ask for it.
  document.addEventListener("click", function (ev) {
    var b = ev.target.closest && ev.target.closest("[data-confirm]");
    if (b && !window.confirm(b.dataset.confirm)) ev.preventDefault();
  });
})();
