// lazycat console, services list: append the row of a service created elsewhere (another tab,
// another owner session) when its pushed row finds no row to replace. No inline script (CSP).
(function () {
  "use strict";
  document.addEventListener("htmx:oobErrorNoTarget", function (ev) {
    var el = ev.detail && ev.detail.content;
    var rows = document.getElementById("service-rows");
    if (!el || !rows || !el.classList || !el.classList.contains("service-row")) return;
    if (el.dataset.fresh !== "true") return;
    el.removeAttribute("hx-swap-oob");
    var empty = rows.querySelector("td.empty");
    if (empty) empty.parentNode.remove();
    rows.appendChild(el);
    htmx.process(el);
  });
})();
