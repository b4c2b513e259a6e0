// dpagg "Private style (DP)" tab: show a run in the WebUI's own progress bar (with its ETA).
// requestProgress and randomId come from the WebUI's javascript/progressbar.js and ui.js; if
// they are missing, the run still starts (without the live progress bar).
function dpaggStartRun() {
    var id = typeof randomId === 'function' ? randomId() :
        'task(' + Math.random().toString(36).slice(2, 9) + ')';
    var anchor = gradioApp().getElementById('dpagg_progress');
    if (typeof requestProgress === 'function' && anchor) {
        requestProgress(id, anchor, null, function() {
            anchor.textContent = '';
        }, function(progress) {
            if (progress && progress.textinfo) {
                anchor.textContent = progress.textinfo;  // text, never markup
            }
        });
    }
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}
