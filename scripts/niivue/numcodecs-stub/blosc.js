export { default } from "./stub.js";
