// Agent mode: tools defined in the page (name, description, JSON-Schema parameters) or the customer-service
// example's (examples/agent.py), sent with each request; each tool call the model makes is a card with its
// arguments, answered by the user or, for the example tools, by a built-in mock of the back office.

import {el} from "./render.js";

const ORDER = {type: "object", properties: {order_id: {type: "string", pattern: "^[0-9]{3,6}$"}}, required: ["order_id"]};
const ORDERS = {"4711": {status: "shipped"}, "1234": {status: "packed"}};

export const EXAMPLE_TOOLS = [
  {name: "get_order_status", description: "Look up where an order is", parameters: ORDER, example: true},
  {name: "cancel_order", description: "Cancel an order", parameters: ORDER, example: true},
  {name: "report_problem", description: "Report an error a customer sees with an order", parameters: ORDER, example: true},
];

// The example's back office: what the example tools answer.
export function mock(name, args) {
  const id = String(args.order_id ?? "");
  if (name === "get_order_status") return {order_id: id, ...(ORDERS[id] || {status: "unknown"})};
  if (name === "cancel_order") return {order_id: id, cancelled: id in ORDERS};
  if (name === "report_problem") return {ticket: "T-" + ([...id].reduce((s, c) => s + c.charCodeAt(0), 0) % 90 + 10)};
  return null;
}

// A tool from the editor's fields; throws an Error that says what to fix.
export function defineTool(name, description, parametersText) {
  name = name.trim();
  if (!/^[A-Za-z_][A-Za-z0-9_-]{0,63}$/.test(name)) {
    throw new Error("a tool name is letters, digits, _ or - (up to 64), starting with a letter or _");
  }
  let parameters;
  try {
    parameters = JSON.parse(parametersText || "{}");
  } catch (e) {
    throw new Error("the parameters are not JSON: " + e.message);
  }
  if (!parameters || parameters.type !== "object") {
    throw new Error('the parameters must be a JSON Schema object: {"type": "object", "properties": {...}}');
  }
  return {name, description: description.trim(), parameters};
}

export function openaiTools(tools) {
  return tools.map((t) => ({type: "function", function: {name: t.name, description: t.description,
                                                         parameters: t.parameters}}));
}

function parseArgs(text) {
  try {
    return JSON.parse(text || "{}");
  } catch {
    return null;
  }
}

// A card for each tool call; `answer(call, resultText)` is called when the user (or the mock) answers one.
export function callCards(calls, results, tools, answer) {
  const box = el("div", {class: "tool-calls"});
  for (const call of calls) {
    const fn = call.function || {};
    const args = parseArgs(fn.arguments);
    const card = el("section", {class: "tool-card", "aria-label": `Tool call ${fn.name}`, "data-call": call.id},
      el("h3", {text: `${fn.name}(…)`}),
      el("pre", {class: "args", text: args ? JSON.stringify(args, null, 2) : fn.arguments}));
    const done = results[call.id];
    if (done !== undefined) {
      card.append(el("div", {class: "result", text: "Result: " + done}));
    } else {
      const id = "result-" + call.id;
      const box2 = el("textarea", {id, rows: 2, placeholder: '{"status": "..."}'});
      const tool = tools.find((t) => t.name === fn.name);
      const send = el("button", {type: "button", class: "send-result", text: "Send result",
                                 onclick: () => answer(call, box2.value.trim() || "{}")});
      card.append(el("label", {for: id, text: "The tool's result (JSON or text)"}), box2, send);
      if (tool && tool.example && args) {
        card.append(el("button", {type: "button", class: "run-mock", text: "Run the example's back office",
                                  onclick: () => answer(call, JSON.stringify(mock(fn.name, args)))}));
      }
      if (!tool) card.append(el("p", {class: "error", text: `The model called ${fn.name}, which is not defined here.`}));
    }
    box.append(card);
  }
  return box;
}
