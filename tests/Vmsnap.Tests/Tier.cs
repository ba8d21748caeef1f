using System.Reflection;
using Vmsnap.Tests.Interop;
using Xunit.Abstractions;
using Xunit.Sdk;

namespace Vmsnap.Tests;

/// <summary>
/// The test tiers, as xunit trait Category (<c>dotnet test --filter Category=Unit</c>). A test class says its tier with
/// <c>[Trait("Category", ...)]</c>: Unit (needs no QEMU, the quick run), Interop (real qemu-img, qemu-io and
/// qemu-system-x86_64, no guest) or Guest (boots the test guest). Its [QemuFact] and [QemuTheory] tests are Interop
/// whatever the class says, except in a Guest class.
/// </summary>
internal static class Tier
{
    public const string Category = "Category";
    public const string Unit = "Unit";
    public const string Interop = "Interop";
    public const string Guest = "Guest";

    public static readonly string[] All = [Unit, Interop, Guest];
}

/// <summary>Every test has exactly one tier: each test class names one, and the QEMU tests' cases carry theirs.</summary>
[Trait("Category", "Unit")]
public class TierTests
{
    private static IEnumerable<Type> TestClasses() =>
        typeof(TierTests).Assembly.GetTypes().Where(t => t is { IsPublic: true, IsAbstract: false } || t.IsNestedPublic)
            .Where(t => t.GetMethods().Any(m => m.GetCustomAttributes<FactAttribute>().Any()));

    private static IEnumerable<string> Categories(MemberInfo member) =>
        member.GetCustomAttributesData()
            .Where(a => a.AttributeType == typeof(TraitAttribute) && (string?)a.ConstructorArguments[0].Value == Tier.Category)
            .Select(a => (string)a.ConstructorArguments[1].Value!);

    [Fact]
    public void Every_test_class_names_exactly_one_tier_and_no_test_method_names_another()
    {
        var wrong = new List<string>();
        foreach (Type t in TestClasses())
        {
            string[] tiers = Categories(t).ToArray();
            if (tiers.Length != 1 || !Tier.All.Contains(tiers[0]))
                wrong.Add($"{t.FullName}: [Trait(\"Category\", ...)] {string.Join(", ", tiers)} (one of {string.Join(", ", Tier.All)})");
            wrong.AddRange(t.GetMethods().Where(m => Categories(m).Any()).Select(m => $"{t.FullName}.{m.Name} names a tier of its own"));
        }
        Assert.Empty(wrong);
        Assert.Contains(typeof(TierTests), TestClasses());
    }

    [Fact]
    public void QEMU_test_cases_are_Interop_or_in_a_Guest_class_Guest()
    {
        int checkedCases = 0;
        foreach (Type t in TestClasses())
        {
            string classTier = Categories(t).Single();
            foreach (MethodInfo m in t.GetMethods().Where(m => m.GetCustomAttribute<QemuFactAttribute>() is not null || m.GetCustomAttribute<QemuTheoryAttribute>() is not null))
            {
                foreach (IXunitTestCase c in QemuDiscovery.Discover(t, m.Name))
                {
                    Assert.Equal([classTier == Tier.Guest ? Tier.Guest : Tier.Interop], c.Traits[Tier.Category]);
                    checkedCases++;
                }
            }
        }
        Assert.True(checkedCases > 100, $"only {checkedCases} QEMU test cases found");
    }
}
