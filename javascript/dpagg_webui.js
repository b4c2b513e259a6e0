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

// The Extra Networks panes whose cards list embeddings (the WebUI's tabs with an Extra Networks
// pane; Forge and A1111 name the Textual Inversion page "textual_inversion").
var dpaggExtraNetworkTabs = ['txt2img', 'img2img'];

// After Train and release: when the result is a release (new or re-used), press the hidden
// refresh button of each Textual Inversion pane, exactly as the pane's own Refresh button does
// (extraNetworksControlRefreshOnClick in the WebUI's javascript/extraNetworks.js clicks
// "<tab>_textual_inversion_extra_refresh_internal"), so the new card shows without a manual
// refresh. The server already reloaded the embedding databases before answering.
function dpaggAfterRun(resultHtml) {
    if (typeof resultHtml === 'string' && resultHtml.indexOf('dpagg-report') !== -1) {
        dpaggExtraNetworkTabs.forEach(function(tabname) {
            var button = gradioApp().getElementById(
                tabname + '_textual_inversion_extra_refresh_internal');
            if (button) {
                button.dispatchEvent(new Event('click'));
            }
        });
    }
    return [];
}

// Leaving a number field of the tab recomputes the plan (issue 20 item 11: when a field is done,
// never per keystroke). Text fields do this with their own blur event; gradio 4's Number (Forge)
// has none, so the tab's hidden "dpagg_replan" button is clicked instead (in A1111 too: the tab
// registers no Number blur, so the plan is computed once).
function dpaggNumberLeft(event) {
    var field = event.target;
    if (!field || field.tagName !== 'INPUT' || field.type !== 'number') {
        return;
    }
    var tab = gradioApp().getElementById('tab_dpagg');
    var button = gradioApp().getElementById('dpagg_replan');
    if (tab && button && tab.contains(field)) {
        button.dispatchEvent(new Event('click'));
    }
}

document.addEventListener('focusout', dpaggNumberLeft, true);
