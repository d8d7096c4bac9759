# Headless Chromium for test/integration/report.test.ts: it loads a `ferry
# report` page in Debian's chromium through playwright-core (an npm
# devDependency, which downloads no browser of its own). Sourced by .ci/run;
# idempotent.
apt_install chromium
