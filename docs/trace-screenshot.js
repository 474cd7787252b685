// Takes docs/trace.png: a `usmp run --trace` file, turned into a self-contained HTML page by
// catapult's trace2html (the Chrome trace viewer), opened in headless Chromium, zoomed to a
// window of trace time, with one slice selected so the panel below shows its details.
//
// Needs Debian's `chromium` and npm's `puppeteer-core` (no browser download):
//   NODE_PATH=.../node_modules node docs/trace-screenshot.js TRACE.html OUT.png WIDTH HEIGHT START_MS END_MS [NAME@CPU@TS_MS]
// The exact commands for docs/trace.png are in README.md ("Looking at a trace").

const puppeteer = require('puppeteer-core');

const [, , html, png, w, h, startMs, endMs, select] = process.argv;
// The selection panel below the tracks has a fixed height; cut the empty part of it off.
const CLIP_HEIGHT = 390;

(async () => {
  const browser = await puppeteer.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--hide-scrollbars'],
    defaultViewport: { width: +w, height: +h },
  });
  const page = await browser.newPage();
  await page.goto('file://' + html, { waitUntil: 'load' });
  // The viewer imports the trace in steps behind an "Importing..." dialog.
  await page.waitForFunction(() => !document.body.innerText.includes('Importing'), {
    timeout: 120000,
  });
  // It sets its initial zoom (the whole trace) just after; zoom after that.
  await new Promise((r) => setTimeout(r, 1000));
  const info = await page.evaluate((s, e, sel) => {
    const tv = document.querySelector('tr-ui-timeline-view');
    const track = tv.trackView_;
    const vp = track.viewport;
    const t = new tr.ui.TimelineDisplayTransform();
    t.set(vp.currentDisplayTransform);
    const width = track.getBoundingClientRect().width - 250; // less the track labels
    t.xSetWorldBounds(+s, +e, width * window.devicePixelRatio);
    vp.setDisplayTransformImmediately(t);
    // Draw the IPI flow arrows (send -> handle), which the viewer hides by default.
    tv.selectedFlowEvents.add('ipi');
    vp.dispatchChangeEvent();
    if (!sel) return 'zoomed';
    const [name, tid, ts] = sel.split('@');
    const thread = tv.model.getOrCreateProcess(1).threads[tid];
    const slice = thread.sliceGroup.slices.find(
      (x) => x.title === name && Math.abs(x.start - +ts) < 0.001);
    if (!slice) return 'zoomed; slice ' + sel + ' not found';
    tv.brushingStateController.changeSelectionFromTimeline(new tr.model.EventSet([slice]));
    return 'zoomed; selected ' + sel;
  }, startMs, endMs, select);
  console.log(info);
  await new Promise((r) => setTimeout(r, 1500));
  await page.screenshot({ path: png, clip: { x: 0, y: 0, width: +w, height: CLIP_HEIGHT } });
  await browser.close();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
