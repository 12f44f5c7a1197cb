// The UI's entry point (a module, loaded by index.html): everything lives in js/, starting
// with js/main.js.
import { start } from './js/main.js';

start();
