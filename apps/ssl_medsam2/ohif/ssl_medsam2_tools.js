/* SSL-MedSAM2 tools for OHIF's MONAI Label mode: Brush, Eraser and "Save label".
 *
 * Why: the bundled OHIF 3.10 MONAI Label mode has no brush, no segment list and no save action (its
 * panel's client has a save_label nobody calls). This registers a tiny OHIF extension
 * (window.config.extensions, read by OHIF at start) to get OHIF's own managers, and adds a bar over the
 * viewer: a segment picker (the segment the brush paints), Brush / Eraser (cornerstone's Brush tool on
 * the active segmentation), and Save label, which runs OHIF's own "Export DICOM SEG"
 * (command storeSegmentation): a STOW-RS of the DICOM-SEG to /proxy/dicom/wado/studies, which the app
 * checks and saves as the image's final label (docs/pacs.md).
 */
(function () {
  var managers = null;
  var TOOLS = { 'SSLMedSAM2Brush': 'FILL_INSIDE_CIRCLE', 'SSLMedSAM2Eraser': 'ERASE_INSIDE_CIRCLE' };
  var extension = {
    id: 'ssl-medsam2-tools',
    preRegistration: function (m) { managers = m; window.sslMedsam2 = m; },
  };
  var cfg;  // app-config.js assigns window.config after this script: add the extension when it does
  Object.defineProperty(window, 'config', {
    configurable: true,
    get: function () { return cfg; },
    set: function (v) {
      cfg = v;
      if (v && typeof v === 'object') { v.extensions = (v.extensions || []).concat([extension]); }
    },
  });

  function services() { return managers.servicesManager.services; }
  function say(text) { var s = document.getElementById('ssl-medsam2-status'); if (s) s.textContent = text; }
  function segmentationId() {
    var segs = services().segmentationService.getSegmentations() || [];
    return segs.length ? segs[segs.length - 1].segmentationId : null;
  }

  function segments() {  // [index, name] of the segmentation's segments, in index order
    var id = segmentationId();
    if (!id) return [];
    var segs = services().segmentationService.getSegmentation(id).segments || {};
    return Object.keys(segs).map(Number).filter(function (i) { return i > 0 && segs[i]; }).sort(function (a, b) { return a - b; })
      .map(function (i) { return [i, segs[i].label || ('segment ' + i)]; });
  }

  function refreshSegments() {  // the picker follows the segmentation OHIF holds (a model run replaces it)
    var pick = document.getElementById('ssl-medsam2-segment');
    if (!pick || !managers) return;
    var list = segments();
    var key = JSON.stringify(list);
    if (pick.dataset.key === key) return;
    pick.dataset.key = key;
    pick.innerHTML = '';
    list.forEach(function (s) {
      var o = document.createElement('option'); o.value = String(s[0]); o.textContent = s[1]; pick.appendChild(o);
    });
    if (list.length) choose(list[0][0]);
  }

  function choose(index) {
    var id = segmentationId();
    if (!id) return;
    services().segmentationService.setActiveSegment(id, Number(index));
    var pick = document.getElementById('ssl-medsam2-segment');
    if (pick) pick.value = String(index);
  }

  function activate(name) {
    var groups = services().toolGroupService;
    var any = false;
    ['default', 'mpr'].forEach(function (id) {
      var group = groups.getToolGroup(id);
      if (!group) return;
      if (!group.hasTool(name)) group.addToolInstance(name, 'Brush', { activeStrategy: TOOLS[name] });
      var current = group.getActivePrimaryMouseButtonTool();
      if (current && current !== name) group.setToolPassive(current);
      group.setToolActive(name, { bindings: [{ mouseButton: 1 }] });
      any = true;
    });
    say(any ? (name === 'SSLMedSAM2Brush' ? 'brush: paint with the left button' : 'eraser: erase with the left button')
            : 'no viewport yet');
  }

  function reason(e) {
    var body = (e && (e.response || (e.request && e.request.response))) || '';
    try { body = JSON.parse(typeof body === 'string' ? body : new TextDecoder().decode(body)).detail || body; } catch (x) {}
    var status = (e && (e.status || (e.request && e.request.status))) || '';
    return ((status ? status + ' ' : '') + (typeof body === 'string' ? body : '') || String(e && e.message || e)).trim();
  }

  function save() {
    var id = segmentationId();
    if (!id) { say('nothing to save: no segmentation yet (run a model or paint first)'); return; }
    var dataSource = managers.extensionManager.getActiveDataSource()[0];
    say('saving...');
    Promise.resolve(managers.commandsManager.runCommand('storeSegmentation', { segmentationId: id, dataSource: dataSource }))
      .then(function (report) { say(report ? 'saved as the final label' : 'not saved (cancelled)'); })
      .catch(function (e) { console.error('ssl-medsam2: not saved', e, e && e.stack); say('not saved: ' + reason(e)); });
  }

  function button(id, text, onClick) {
    var b = document.createElement('button');
    b.id = id; b.textContent = text; b.onclick = onClick;
    b.style.cssText = 'margin:0 4px;padding:3px 10px;border-radius:4px;border:1px solid #5acce6;background:#0b1a42;color:#fff;cursor:pointer';
    return b;
  }

  function mount() {
    if (document.getElementById('ssl-medsam2-tools') || !managers || !document.body) return;
    if (window.location.pathname.indexOf('/monai-label') < 0) return;
    var bar = document.createElement('div');
    bar.id = 'ssl-medsam2-tools';
    bar.style.cssText = 'position:fixed;top:52px;left:50%;transform:translateX(-50%);z-index:1000;' +
      'background:rgba(4,28,74,.92);color:#fff;padding:5px 8px;border-radius:6px;font:13px sans-serif';
    bar.appendChild(document.createTextNode('SSL-MedSAM2'));
    var pick = document.createElement('select');
    pick.id = 'ssl-medsam2-segment'; pick.title = 'the segment the brush paints';
    pick.style.cssText = 'margin:0 4px;background:#0b1a42;color:#fff;border:1px solid #5acce6;border-radius:4px';
    pick.onchange = function () { choose(pick.value); };
    bar.appendChild(pick);
    bar.appendChild(button('ssl-medsam2-brush', 'Brush', function () { activate('SSLMedSAM2Brush'); }));
    bar.appendChild(button('ssl-medsam2-eraser', 'Eraser', function () { activate('SSLMedSAM2Eraser'); }));
    bar.appendChild(button('ssl-medsam2-save', 'Save label', save));
    var status = document.createElement('span');
    status.id = 'ssl-medsam2-status'; status.style.marginLeft = '6px';
    bar.appendChild(status);
    document.body.appendChild(bar);
  }
  setInterval(function () { mount(); try { refreshSegments(); } catch (e) { /* no viewport yet */ } }, 500);
})();
