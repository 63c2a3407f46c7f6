// Sends identify + track with the unmodified @rudderstack/rudder-sdk-node (gzip on by
// default: a gzip body that axios labels application/x-www-form-urlencoded).
// usage: node rudderstack_node.js HOST WRITE_KEY USER_ID EMAIL
const Analytics = require('@rudderstack/rudder-sdk-node');

const [host, writeKey, userId, email] = process.argv.slice(2);
const client = new Analytics(writeKey, {
  dataPlaneUrl: host,
  flushAt: 100,
  flushInterval: 600000,
  retryCount: 0,
  logLevel: 'error',
});
client.identify({ userId, traits: { email, first_name: 'Grace' } });
client.track({ userId, event: 'Order Completed', properties: { total: 5 } });
client.flush((err) => {
  if (err) {
    console.error('sdk error:', err.message || err);
    process.exit(1);
  }
  console.log('sent');
  process.exit(0);
});
