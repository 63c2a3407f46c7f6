// The console in a real browser: Debian's Chromium driven by playwright-core, against
// the real platform on a real Kafka (tests/tests/console.rs starts both and runs this).
//
// Environment: CONSOLE_URL, INGEST_URL, WRITE_KEY, CONSOLE_USER, CONSOLE_PASSWORD,
// CHROMIUM (default /usr/bin/chromium), TAG (makes this run's people and segment
// unique), SCREENSHOTS (a folder: a screenshot of each main page is written there).
//
// Prints one line per step; exits non-zero on the first failure.
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';

// playwright-core comes from NODE_PATH (an npm folder cached outside the clone), which
// only require() reads.
const { chromium } = createRequire(import.meta.url)('playwright-core');

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is required`);
  return v;
};
const consoleUrl = env('CONSOLE_URL');
const ingestUrl = env('INGEST_URL');
const writeKey = env('WRITE_KEY');
const user = env('CONSOLE_USER');
const password = env('CONSOLE_PASSWORD');
const tag = env('TAG', `t${Date.now()}`);
const shots = process.env.SCREENSHOTS;
if (shots) mkdirSync(shots, { recursive: true });

const step = (what) => console.log(`browser: ${what}`);
const HOSTILE = '<img src=x onerror="window.__xss=1">';
const HOSTILE_2 = '</script><script>window.__xss=2</script>';

async function send(path, body) {
  const r = await fetch(`${ingestUrl}/v1/${path}`, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
      Authorization: `Basic ${Buffer.from(`${writeKey}:`).toString('base64')}`,
    },
    body: JSON.stringify(body),
  });
  assert.equal(r.status, 200, `ingest answered ${r.status}: ${await r.text()}`);
}

async function shot(page, name) {
  if (shots) await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

const browser = await chromium.launch({
  executablePath: env('CHROMIUM', '/usr/bin/chromium'),
  headless: true,
  // Containers run tests as root, where Chromium's sandbox cannot start.
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
const page = await context.newPage();
page.setDefaultTimeout(30_000);
const dialogs = [];
page.on('dialog', (d) => { dialogs.push(d.message()); d.dismiss(); });
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(String(e)));

try {
  // 1. Without a session every page leads to the login form; a wrong password is refused.
  await page.goto(`${consoleUrl}/segments`);
  assert.match(page.url(), /\/login$/, 'no session: the login form');
  await shot(page, 'login');
  await page.fill('input[name=user]', user);
  await page.fill('input[name=password]', 'not the password');
  await page.click('button[type=submit]');
  await page.waitForSelector('p.error');
  assert.match(await page.textContent('p.error'), /wrong password/);
  await page.fill('input[name=user]', user);
  await page.fill('input[name=password]', password);
  await page.click('button[type=submit]');
  await page.waitForURL(`${consoleUrl}/`);
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === 'tessera_session');
  assert.ok(session && session.httpOnly && session.sameSite === 'Strict', 'an HttpOnly, SameSite=Strict session cookie');
  step('logged in (a wrong password was refused)');

  // 2. A person with hostile trait values, and an order.
  const email = `${tag}@mail.test`;
  await send('identify', {
    userId: `u-${tag}`,
    traits: { email, first_name: 'Browser', nickname: HOSTILE, bio: HOSTILE_2, plan: `gold-${tag}` },
  });
  step('sent the person through the HTTP API');

  // 3. The segment builder: a trait condition and an event count with a property filter in
  // a relative window; the definition it makes; a refusal; the dry run; save.
  await page.goto(`${consoleUrl}/segments/new`);
  await page.fill('input[name=segment-id]', `vip-${tag}`);
  await page.fill('input[name=segment-name]', 'VIP (browser test)');
  await page.selectOption('select[name=add-kind]', 'trait');
  await page.click('button.add-condition');
  const trait = page.locator('.condition[data-kind=trait]');
  await trait.locator('input[name=test-name]').fill('plan');
  await trait.locator('input[name=test-value]').fill(`gold-${tag}`);
  await page.selectOption('select[name=add-kind]', 'event_count');
  await page.click('button.add-condition');
  const count = page.locator('.condition[data-kind=event_count]');
  await count.locator('input[name=event]').fill('Order Completed');
  await count.locator('input[name=min]').fill('1');
  await count.locator('input[name=within]').fill('30');
  await count.locator('select[name=unit]').selectOption('d');
  await count.locator('button.add-filter').click();
  const filter = count.locator('.filter');
  await filter.locator('input[name=test-name]').fill('total');
  await filter.locator('select[name=test-op]').selectOption('gt');
  await filter.locator('input[name=test-value]').fill('100');
  const made = JSON.parse(await page.textContent('#definition-preview'));
  assert.deepEqual(made, {
    id: `vip-${tag}`,
    name: 'VIP (browser test)',
    condition: { all: [
      { trait: { name: 'plan', equals: `gold-${tag}` } },
      { event_count: { event: 'Order Completed', min: 1, where: [{ property: 'total', gt: 100 }], within: '30d' } },
    ] },
  });
  step('the builder made the expected definition');

  // A bad window is refused with the API's own message, and nothing is saved.
  await count.locator('input[name=within]').fill('0');
  await page.click('#save');
  await page.waitForSelector('#builder-message.error');
  const refusal = await page.textContent('#builder-message');
  assert.match(refusal, /within|window/i, `the API's reason: ${refusal}`);
  await count.locator('input[name=within]').fill('30');
  step(`a bad window was refused: "${refusal}"`);

  await page.click('#dry-run');
  await page.waitForSelector('#builder-message.ok');
  assert.match(await page.textContent('#builder-message'), /^\d+ of \d+ profiles would be in this segment now\.$/);
  step(`dry run: ${await page.textContent('#builder-message')}`);
  await shot(page, 'segment-builder');

  await page.click('#save');
  await page.waitForURL(`${consoleUrl}/segments/vip-${tag}`);
  const live = page.locator(`[data-latest="segment.size.vip-${tag}"]`).first();
  step('saved; the segment page shows its live size');

  // 4. The person qualifies: the segment page's size moves without a reload.
  await page.evaluate(() => { window.__marker = 'segment page'; });
  await send('track', { userId: `u-${tag}`, event: 'Order Completed', properties: { total: 150 } });
  await page.waitForFunction((el) => el.textContent.trim() === '1', await live.elementHandle(), { timeout: 30_000 });
  assert.equal(await page.evaluate(() => window.__marker), 'segment page', 'no reload');
  step('the person entered the segment: live size 1 without a reload');
  await page.waitForSelector('figure.chart polyline', { state: 'attached' });
  await shot(page, 'segment');

  // 5. The 360 view: found by email; the address holds no personal data.
  await page.goto(`${consoleUrl}/profiles`);
  await page.fill('input[name=value]', email.toUpperCase());
  await page.selectOption('select[name=type]', 'email');
  await page.click('form.search button[type=submit]');
  await page.waitForURL(/\/profiles\/[^/]+$/);
  assert.ok(!page.url().includes(tag) && !page.url().includes('@'), `no identifier in the address: ${page.url()}`);
  await page.waitForSelector('#profile.connected');
  const panel = page.locator('#panel');
  assert.ok((await panel.textContent()).includes(email), 'identifiers shown');
  assert.ok((await panel.locator('#segments').textContent()).includes(`vip-${tag}`), 'segment membership shown');
  step('found the person by email; the profile follows live');

  // Hostile values are shown as text and run nothing.
  assert.ok((await panel.textContent()).includes(HOSTILE), 'the hostile value is shown as text');
  assert.ok((await panel.textContent()).includes(HOSTILE_2));
  assert.equal(await page.locator('#panel img').count(), 0, 'no element was injected');
  assert.equal(await page.evaluate(() => window.__xss), undefined, 'no script ran');
  step('hostile trait values rendered harmlessly');

  // Provenance on demand.
  const why = page.locator('table.traits tr', { hasText: 'plan' }).locator('details.why');
  await why.locator('summary').click();
  assert.match(await why.textContent(), /Source[\s\S]*Event time[\s\S]*Strategy/);

  // 6. The timeline updates live when an event arrives.
  await page.evaluate(() => { window.__marker = 'profile page'; });
  const before = await page.locator('#timeline li').count();
  await send('track', { userId: `u-${tag}`, event: `Live Event ${tag}`, properties: { note: HOSTILE } });
  await page.waitForSelector(`#timeline li:has-text("Live Event ${tag}")`, { timeout: 30_000 });
  assert.ok((await page.locator('#timeline li').count()) > before);
  assert.equal(await page.evaluate(() => window.__marker), 'profile page', 'no reload');
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  step('the timeline showed the new event without a reload');
  await shot(page, 'profile');

  // 7. Segments, activations and the pipeline dashboard.
  await page.goto(`${consoleUrl}/segments`);
  await page.waitForSelector(`a[href="/segments/vip-${tag}"]`);
  await page.waitForSelector('.spark polyline', { state: 'attached' });
  await shot(page, 'segments');
  await page.goto(`${consoleUrl}/activations`);
  assert.ok((await page.textContent('main')).includes('email-demo'));
  await page.waitForSelector('figure.chart');
  await shot(page, 'activations');
  await page.goto(`${consoleUrl}/`);
  await page.waitForSelector('figure.chart[data-chart="events.accepted"] polyline', { state: 'attached' });
  await page.waitForSelector('.status .chip.up');
  await send('track', { userId: `u-${tag}`, event: 'Dashboard Ping' });
  await page.waitForFunction(() => {
    const t = document.querySelector('figure.chart[data-chart="events.accepted"] .latest');
    return t && parseFloat(t.textContent) > 0;
  }, null, { timeout: 30_000 });
  step('the pipeline dashboard moved with the events');
  await shot(page, 'pipeline');

  // 8. A change without the session's CSRF token is refused; logging out ends the session.
  const forged = await page.evaluate(async (id) => {
    const r = await fetch('/segments/save', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ definition: { id, condition: { has_identifier: 'email' } } }) });
    return r.status;
  }, `forged-${tag}`);
  assert.equal(forged, 403, 'no CSRF token: refused');
  await page.click('form.logout button');
  await page.waitForURL(/\/login$/);
  await page.goto(`${consoleUrl}/profiles`);
  assert.match(page.url(), /\/login$/, 'logged out: the login form again');
  step('a request without the CSRF token was refused; logout ended the session');

  assert.deepEqual(dialogs, [], 'no dialog opened');
  assert.deepEqual(pageErrors, [], 'no script error');
  console.log('browser: all steps passed');
} catch (e) {
  if (shots) await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
  console.error(`browser: FAILED at ${page.url()}: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
