const FOLDER = __FOLDER__, CHUNKS = __CHUNKS__, PER_PAGE = __CHUNK__;
const BASE = encodeURIComponent(FOLDER) + '/';
const loaded = {}; let page = 0; let shown = []; let generation = 0; let more = false;
function batchimgRows(n, rows) { loaded[n] = rows; }
function load(n) {
  return new Promise((ok, fail) => {
    if (loaded[n]) return ok(loaded[n]);
    const s = document.createElement('script');
    s.src = BASE + 'rows-' + n + '.js';
    s.onload = () => ok(loaded[n] || []);
    s.onerror = () => fail(new Error('cannot load ' + s.src));
    document.head.appendChild(s);
  });
}
function wanted() {
  const f = {};
  document.querySelectorAll('[data-filter]').forEach(s => { if (s.value) f[s.dataset.filter] = s.value; });
  return f;
}
function value(r, k) { return k.startsWith('metadata.') ? (r.metadata || {})[k.slice(9)] : r[k]; }
function text(v) { return v !== null && typeof v === 'object' ? JSON.stringify(v) : String(v); }
function matches(r, f) {
  for (const [k, v] of Object.entries(f)) {
    const got = text(value(r, k));
    const control = document.querySelector('[data-filter="' + CSS.escape(k) + '"]');
    if (control.tagName === 'INPUT' ? !got.toLowerCase().includes(v.toLowerCase()) : got !== v) return false;
  }
  return true;
}
function esc(s) {
  return (s == null ? '' : String(s)).replace(/&/g, '&amp;').replace(/</g, '&lt;')
    .replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&#39;');
}
function card(r) {
  const pic = r.thumb
    ? '<img loading="lazy" alt="' + esc(r.id) + '" src="' + esc(BASE + encodeURI(r.thumb)) + '">'
    : '<div class="noimg">' + esc(r.status === 'ok' ? 'no picture' : r.status) + '</div>';
  const cost = r.cost == null ? 'cost unknown' : '$' + Number(r.cost).toFixed(4);
  const meta = Object.entries(r.metadata || {}).map(([k, v]) => esc(k) + ': ' + esc(text(v))).join('<br>');
  return '<div class="card" data-status="' + esc(r.status) + '" title="' + esc(r.prompt) + '">' + pic +
    '<div class="id">' + esc(r.id) + (r.i ? ' #' + esc(r.i) : '') + '</div>' +
    '<div class="meta">' + esc([r.model, r.size, r.quality, r.via].filter(Boolean).join(' · ')) +
    ' · ' + cost + '</div><details><summary>prompt</summary>' + esc(r.prompt) +
    (r.error ? '<br><b>' + esc(r.error) + '</b>' : '') + (meta ? '<br>' + meta : '') +
    ' (line ' + esc(r.line) + ')</details></div>';
}
async function render() {
  const mine = ++generation;  // a newer render wins: an older, slower one is dropped
  const f = wanted(), info = document.getElementById('pageinfo');
  let rows, label;
  try {
    if (Object.keys(f).length === 0) {
      rows = await load(page);
      more = page + 1 < CHUNKS;
      label = 'page ' + (page + 1) + ' of ' + CHUNKS;
    } else {
      info.textContent = 'searching…';
      const found = [];
      for (let n = 0; n < CHUNKS && found.length <= PER_PAGE * (page + 1); n++) {
        for (const r of await load(n)) if (matches(r, f)) found.push(r);
        if (mine !== generation) return;
      }
      rows = found.slice(PER_PAGE * page, PER_PAGE * (page + 1));
      more = found.length > PER_PAGE * (page + 1);
      label = rows.length ? 'page ' + (page + 1) + ' (filtered)' : 'no image matches';
    }
  } catch (e) {
    if (mine !== generation) return;
    info.textContent = 'the gallery is in the folder "' + FOLDER + '", which should be beside this page';
    return;
  }
  if (mine !== generation) return;
  shown = rows;
  info.textContent = label;
  document.getElementById('gallery').innerHTML = shown.map(card).join('');
  document.getElementById('count').textContent = shown.length;
  document.getElementById('next').disabled = !more;
  document.getElementById('prev').disabled = page === 0;
}
document.querySelectorAll('[data-filter]').forEach(s => s.addEventListener(s.tagName === 'INPUT' ? 'input' : 'change', () => { page = 0; render(); }));
document.getElementById('prev').addEventListener('click', () => { if (page > 0) { page--; render(); } });
document.getElementById('next').addEventListener('click', () => { if (more) { page++; render(); } });
render();
