const FOLDER = __FOLDER__, CHUNKS = __CHUNKS__, PER_PAGE = __CHUNK__;
const loaded = {}; let all = []; let page = 0; let shown = [];
function batchimgRows(n, rows) { loaded[n] = rows; }
function load(n) {
  return new Promise((ok, fail) => {
    if (loaded[n]) return ok(loaded[n]);
    const s = document.createElement('script');
    s.src = FOLDER + '/rows-' + n + '.js';
    s.onload = () => ok(loaded[n] || []); s.onerror = fail;
    document.head.appendChild(s);
  });
}
function wanted() {
  const f = {};
  document.querySelectorAll('select[data-filter]').forEach(s => { if (s.value) f[s.dataset.filter] = s.value; });
  return f;
}
function matches(r, f) {
  for (const [k, v] of Object.entries(f)) {
    const got = k.startsWith('metadata.') ? r.metadata[k.slice(9)] : r[k];
    if (String(got) !== v) return false;
  }
  return true;
}
function esc(s) {
  return (s == null ? '' : String(s)).replace(/&/g, '&amp;').replace(/</g, '&lt;')
    .replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&#39;');
}
function card(r) {
  const pic = r.thumb ? '<img loading="lazy" alt="' + esc(r.id) + '" src="' + FOLDER + '/' + r.thumb + '">'
                      : '<div class="noimg">' + esc(r.status) + '</div>';
  const cost = r.cost == null ? 'cost unknown' : '$' + Number(r.cost).toFixed(4);
  const meta = Object.entries(r.metadata || {}).map(([k, v]) => esc(k) + ': ' + esc(v)).join('<br>');
  return '<div class="card" data-status="' + esc(r.status) + '" title="' + esc(r.prompt) + '">' + pic +
    '<div class="id">' + esc(r.id) + (r.i ? ' #' + r.i : '') + '</div>' +
    '<div class="meta">' + esc([r.model, r.size, r.quality, r.via].filter(Boolean).join(' · ')) + ' · ' + cost + '</div>' +
    '<details><summary>prompt</summary>' + esc(r.prompt) + (r.error ? '<br><b>' + esc(r.error) + '</b>' : '') +
    (meta ? '<br>' + meta : '') + ' (line ' + esc(r.line) + ')</details></div>';
}
async function render() {
  const f = wanted();
  if (Object.keys(f).length === 0) {
    const rows = await load(page);
    shown = rows;
    document.getElementById('pageinfo').textContent = 'page ' + (page + 1) + ' of ' + CHUNKS;
  } else {
    const rows = [];
    for (let n = 0; n < CHUNKS && rows.length < PER_PAGE * (page + 1); n++) {
      for (const r of await load(n)) if (matches(r, f)) rows.push(r);
    }
    shown = rows.slice(PER_PAGE * page, PER_PAGE * (page + 1));
    document.getElementById('pageinfo').textContent = 'page ' + (page + 1) + ' (filtered)';
  }
  document.getElementById('gallery').innerHTML = shown.map(card).join('');
  document.getElementById('count').textContent = shown.length;
}
document.querySelectorAll('select[data-filter]').forEach(s => s.addEventListener('change', () => { page = 0; render(); }));
document.getElementById('prev').addEventListener('click', () => { if (page > 0) { page--; render(); } });
document.getElementById('next').addEventListener('click', () => { page++; if (page >= CHUNKS && !Object.keys(wanted()).length) page = CHUNKS - 1; render(); });
render();
