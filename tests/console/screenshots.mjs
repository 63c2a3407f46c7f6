// Screenshots of the console's main pages for docs/console/, taken from the local run
// (deploy/run.sh, with its demo people and demo traffic):
//
//   NODE_PATH=~/.cache/tessera/node-playwright/node_modules node tests/console/screenshots.mjs
//
// Environment (defaults: the local run): CONSOLE_URL, CONSOLE_USER, CONSOLE_PASSWORD,
// CHROMIUM, OUT (default docs/console). Refresh the screenshots when a page changes.
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';

const { chromium } = createRequire(import.meta.url)('playwright-core');
const url = process.env.CONSOLE_URL ?? 'http://127.0.0.1:8084';
const out = process.env.OUT ?? 'docs/console';
mkdirSync(out, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const page = await (await browser.newContext({ viewport: { width: 1360, height: 860 } })).newPage();
const shot = (name) => page.screenshot({ path: `${out}/${name}.png`, fullPage: true });
try {
  await page.goto(`${url}/login`);
  await shot('login');
  await page.fill('input[name=user]', process.env.CONSOLE_USER ?? 'admin');
  await page.fill('input[name=password]', process.env.CONSOLE_PASSWORD ?? 'tessera-demo');
  await page.click('button[type=submit]');
  await page.waitForURL(`${url}/`);
  // Let the charts gather a minute of readings.
  await page.waitForTimeout(60_000);
  await shot('pipeline');

  await page.goto(`${url}/profiles`);
  await page.fill('input[name=value]', 'ada@example.com');
  await page.click('form.search button[type=submit]');
  await page.waitForSelector('#profile.connected');
  await page.locator('table.traits tr', { hasText: 'plan' }).locator('summary').click();
  await shot('profile');

  await page.goto(`${url}/segments`);
  await page.waitForTimeout(2_000);
  await shot('segments');
  await page.goto(`${url}/segments/buyers`);
  await page.waitForTimeout(2_000);
  await shot('segment');

  await page.goto(`${url}/segments/new`);
  await page.fill('input[name=segment-id]', 'gold-buyers');
  await page.fill('input[name=segment-name]', 'Gold plan buyers');
  await page.click('button.add-condition');
  const trait = page.locator('.condition[data-kind=trait]');
  await trait.locator('input[name=test-name]').fill('plan');
  await trait.locator('input[name=test-value]').fill('gold');
  await page.selectOption('select[name=add-kind]', 'event_count');
  await page.click('button.add-condition');
  const count = page.locator('.condition[data-kind=event_count]');
  await count.locator('input[name=event]').fill('Order Completed');
  await count.locator('input[name=within]').fill('30');
  await count.locator('button.add-filter').click();
  await count.locator('.filter input[name=test-name]').fill('total');
  await count.locator('.filter select[name=test-op]').selectOption('gte');
  await count.locator('.filter input[name=test-value]').fill('50');
  await page.click('#dry-run');
  await page.waitForSelector('#builder-message.ok');
  await shot('segment-builder');

  await page.goto(`${url}/activations`);
  await page.waitForTimeout(2_000);
  await shot('activations');
  console.log(`screenshots: written to ${out}/`);
} finally {
  await browser.close();
}
